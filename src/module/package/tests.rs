use std::io::Write;

use zip::write::SimpleFileOptions;

use super::*;

const LIGHT: &str = "<safe><service mode=\"light\"/></safe>";

fn file(path: &str, mode: u32, data: &str) -> (String, Content) {
    (
        path.to_string(),
        Content::File {
            mode,
            data: data.as_bytes().to_vec(),
        },
    )
}

fn good_entries() -> Vec<(String, Content)> {
    vec![
        file("conf/userconfig.xml", 0o644, LIGHT),
        file("bin/start_prim", 0o755, "#!/bin/sh\necho start\n"),
        file("bin/stop_prim", 0o755, "#!/bin/sh\necho stop\n"),
        (
            "bin/start_both".into(),
            Content::Symlink {
                target: "start_prim".into(),
            },
        ),
    ]
}

/// A zip written entry by entry, to make archives the builder refuses to make.
fn raw_zip(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, mode, data) in entries {
        if mode & S_IFMT == S_IFLNK {
            writer
                .add_symlink(
                    *name,
                    std::str::from_utf8(data).unwrap(),
                    SimpleFileOptions::default(),
                )
                .unwrap();
        } else {
            writer
                .start_file(*name, SimpleFileOptions::default().unix_permissions(*mode))
                .unwrap();
            writer.write_all(data).unwrap();
        }
    }
    writer.finish().unwrap().into_inner()
}

fn reason(bytes: Vec<u8>) -> String {
    Package::open(bytes)
        .expect_err("the package should be refused")
        .to_string()
}

#[test]
fn a_good_package_opens_and_materializes() {
    let package = Package::open(build_zip("web", &good_entries())).unwrap();
    assert_eq!(package.name, "web");
    assert_eq!(
        package.digest,
        blake3::hash(&package.bytes).to_hex().to_string()
    );
    let dir = tempfile::tempdir().unwrap();
    let target = module_dir(dir.path(), "web");
    package.materialize(&target).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(target.join("bin/start_prim"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(target.join("bin/start_both")).unwrap(),
        Path::new("start_prim")
    );
    // A second version replaces the first completely.
    let mut entries = good_entries();
    entries.retain(|(p, _)| p != "bin/stop_prim");
    Package::open(build_zip("web", &entries))
        .unwrap()
        .materialize(&target)
        .unwrap();
    assert!(!target.join("bin/stop_prim").exists());
    assert!(target.join("bin/start_prim").exists());
}

#[test]
fn unsafe_or_incomplete_archives_are_refused_with_the_reason() {
    let cfg = LIGHT.as_bytes();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            raw_zip(&[
                ("web/conf/userconfig.xml", 0o644, cfg),
                ("web/../../etc/cron.d/x", 0o644, b"x"),
            ]),
            "path traversal",
        ),
        (raw_zip(&[("/etc/passwd", 0o644, b"x")]), "absolute path"),
        (
            raw_zip(&[
                ("web/conf/userconfig.xml", 0o644, cfg),
                ("other/file", 0o644, b"x"),
            ]),
            "outside the module folder 'web/'",
        ),
        (
            raw_zip(&[
                ("web/conf/userconfig.xml", 0o644, cfg),
                ("web/bin/x", S_IFLNK | 0o777, b"../../../etc/shadow"),
            ]),
            "escapes the module",
        ),
        (
            raw_zip(&[
                ("web/conf/userconfig.xml", 0o644, cfg),
                ("web/bin/x", S_IFLNK | 0o777, b"/etc/shadow"),
            ]),
            "escapes the module",
        ),
        (
            raw_zip(&[
                ("web/conf/userconfig.xml", 0o644, cfg),
                ("web/bin/start_prim", 0o644, b"#!/bin/sh"),
            ]),
            "without the run bit",
        ),
        (
            raw_zip(&[("web/bin/start_prim", 0o755, b"#!/bin/sh")]),
            "has no web/conf/userconfig.xml",
        ),
        (
            raw_zip(&[(
                "web/conf/userconfig.xml",
                0o644,
                b"<safe><service mode=\"light\">",
            )]),
            "web/conf/userconfig.xml:1:",
        ),
        (
            raw_zip(&[("../web/conf/userconfig.xml", 0o644, cfg)]),
            "path traversal",
        ),
        (
            raw_zip(&[("we b/conf/userconfig.xml", 0o644, cfg)]),
            "invalid module name",
        ),
        (
            b"PK\x03\x04 certainly not a zip".to_vec(),
            "not a zip archive",
        ),
        (vec![0u8; MAX_PACKAGE_BYTES + 1], "the limit is"),
    ];
    for (bytes, fragment) in cases {
        let reason = reason(bytes);
        assert!(
            reason.contains(fragment),
            "expected '{fragment}' in: {reason}"
        );
    }
}

#[test]
fn a_zip_bomb_is_refused() {
    // Highly compressible content larger than the unpacked limit.
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    writer
        .start_file("web/conf/userconfig.xml", options)
        .unwrap();
    writer.write_all(LIGHT.as_bytes()).unwrap();
    writer.start_file("web/big", options).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..(MAX_UNPACKED_BYTES >> 20) + 1 {
        writer.write_all(&chunk).unwrap();
    }
    let bytes = writer.finish().unwrap().into_inner();
    assert!(bytes.len() < MAX_PACKAGE_BYTES, "the bomb itself is small");
    assert!(reason(bytes).contains("unpacked files would exceed"));
}

#[test]
fn a_config_edit_is_validated_and_repackaged() {
    let package = Package::open(build_zip("web", &good_entries())).unwrap();
    let edited = package
        .with_userconfig("<safe><service mode=\"light\" maxloop=\"7\"/></safe>")
        .unwrap();
    assert_eq!(edited.config.maxloop, 7);
    assert_ne!(edited.digest, package.digest);
    let refused = package.with_userconfig("<safe><service mode=\"light\" maxloop=\"x\"/></safe>");
    assert!(refused.unwrap_err().to_string().contains("maxloop"));
}
