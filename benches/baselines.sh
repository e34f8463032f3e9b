#!/usr/bin/env bash
# The replicated-filesystem baselines of benches/mirror.rs, on one machine, 127.0.0.1 only.
#
#   baselines.sh gluster-up   BASE MOUNT   GlusterFS replica-2 volume (bricks BASE/brick1,
#                                          BASE/brick2) through its FUSE client at MOUNT
#   baselines.sh gluster-down BASE MOUNT   unmount, stop everything, remove BASE
#   baselines.sh bindfs-up    SOURCE MOUNT plain FUSE passthrough of SOURCE, no replication
#   baselines.sh bindfs-down  MOUNT
#
# glusterd is a private instance (own volfile, working and run directories under BASE,
# bound to 127.0.0.1:24007), not the system service. The gluster CLI refuses "127.0.0.1"
# and "localhost" as brick hosts, hence 127.1 (the same address); "force" allows two
# bricks of one volume on one server and on the root filesystem.
set -euo pipefail

VOLUME=rbench
HOST=127.1

fail() {
    echo "baselines.sh: $*" >&2
    exit 1
}

gcli() {
    timeout 120 gluster --mode=script --glusterd-sock="$BASE/run/glusterd.socket" \
        --log-file="$BASE/log/cli.log" "$@"
}

# PIDs of gluster daemons whose command line names BASE.
gluster_pids() {
    local pid
    for pid in $(pgrep gluster || true); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$BASE/"; then
            echo "$pid"
        fi
    done
}

bricks_online() {
    gcli volume status "$VOLUME" --xml 2>/dev/null |
        awk '/<node>/{b=0;s=0} /<path>\//{b=1} /<status>1<\/status>/{s=1} /<\/node>/{if(b&&s)n++} END{print n+0}'
}

gluster_up() {
    command -v glusterd >/dev/null || fail "glusterd not found (apt-get install glusterfs-server)"
    if ss -Hltn "sport = :24007" | grep -q .; then
        fail "port 24007 is taken (another glusterd?)"
    fi
    mkdir -p "$BASE"/{brick1,brick2,glusterd,run,log} "$MOUNT" /run/gluster /var/log/glusterfs
    cat >"$BASE/glusterd.vol" <<EOF
volume management
    type mgmt/glusterd
    option working-directory $BASE/glusterd
    option run-directory $BASE/run
    option glusterd-sockfile $BASE/run/glusterd.socket
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.listen-port 24007
    option ping-timeout 0
    option event-threads 1
end-volume
EOF
    glusterd -f "$BASE/glusterd.vol" -p "$BASE/run/glusterd.pid" -l "$BASE/log/glusterd.log"
    for _ in $(seq 300); do
        gcli volume list >/dev/null 2>&1 && break
        sleep 0.2
    done
    gcli volume list >/dev/null 2>&1 || fail "glusterd did not start; see $BASE/log/glusterd.log"
    gcli volume create "$VOLUME" replica 2 transport tcp \
        "$HOST:$BASE/brick1" "$HOST:$BASE/brick2" force >/dev/null
    gcli volume start "$VOLUME" >/dev/null
    for _ in $(seq 300); do
        [ "$(bricks_online)" = 2 ] && break
        sleep 0.2
    done
    [ "$(bricks_online)" = 2 ] || fail "the bricks did not come online"
    mount -t glusterfs -o "log-file=$BASE/log/mount.log" "127.0.0.1:/$VOLUME" "$MOUNT"
    # A file written through the mount must land on both bricks.
    for _ in $(seq 60); do
        if echo probe 2>/dev/null >"$MOUNT/.probe" &&
            [ -f "$BASE/brick1/.probe" ] && [ -f "$BASE/brick2/.probe" ]; then
            rm -f "$MOUNT/.probe"
            return 0
        fi
        sleep 0.5
    done
    fail "a probe file did not reach both bricks; see $BASE/log/mount.log"
}

gluster_down() {
    if mountpoint -q "$MOUNT"; then
        umount "$MOUNT" 2>/dev/null || umount -l "$MOUNT"
    fi
    if [ -S "$BASE/run/glusterd.socket" ]; then
        gcli volume stop "$VOLUME" force >/dev/null 2>&1 || true
        gcli volume delete "$VOLUME" >/dev/null 2>&1 || true
    fi
    local pids
    pids=$(gluster_pids)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(gluster_pids)" ] && break
            sleep 0.1
        done
        pids=$(gluster_pids)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    rm -rf -- "$BASE"
    rm -f /var/log/glusterfs/bricks/*"${BASE//\//-}"*.log
    rmdir "$MOUNT" 2>/dev/null || true
}

bindfs_up() {
    command -v bindfs >/dev/null || fail "bindfs not found (apt-get install bindfs)"
    mkdir -p "$MOUNT"
    # bindfs here is built on libfuse2: without big_writes every write reaches it in
    # 4 KiB pieces.
    bindfs -o big_writes "$SOURCE" "$MOUNT"
}

bindfs_down() {
    if mountpoint -q "$MOUNT"; then
        umount "$MOUNT" 2>/dev/null || umount -l "$MOUNT"
    fi
    rmdir "$MOUNT" 2>/dev/null || true
}

case "${1:-}" in
    gluster-up | gluster-down)
        [ $# -eq 3 ] || fail "usage: $0 $1 BASE MOUNT"
        BASE=$(realpath -m "$2")
        MOUNT=$(realpath -m "$3")
        if [ "$1" = gluster-up ]; then gluster_up; else gluster_down; fi
        ;;
    bindfs-up)
        [ $# -eq 3 ] || fail "usage: $0 bindfs-up SOURCE MOUNT"
        SOURCE=$(realpath "$2")
        MOUNT=$(realpath -m "$3")
        bindfs_up
        ;;
    bindfs-down)
        [ $# -eq 2 ] || fail "usage: $0 bindfs-down MOUNT"
        MOUNT=$(realpath -m "$2")
        bindfs_down
        ;;
    *)
        fail "usage: $0 gluster-up|gluster-down|bindfs-up|bindfs-down ..."
        ;;
esac
