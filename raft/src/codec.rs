//! The binary encoding of log entries, snapshots and transport frames.
//!
//! Everything that is written to disk or sent between nodes goes through [`encode`] and
//! [`decode`], so the encoding can be replaced in one place. Today: bincode 2 through
//! serde, standard configuration (varint integers, little endian).

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("cannot decode: {0} trailing bytes after the value")]
    Trailing(usize),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(
        value,
        bincode::config::standard(),
    )?)
}

/// Decodes exactly one value; trailing bytes are an error (they mean a framing bug or
/// a corrupt record, never something to ignore).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
    if read != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_trailing_bytes() {
        let value = (7u64, "seven".to_string(), vec![1u8, 2, 3]);
        let mut bytes = encode(&value).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), value);
        bytes.push(0);
        assert!(matches!(
            decode::<(u64, String, Vec<u8>)>(&bytes),
            Err(CodecError::Trailing(1))
        ));
        assert!(decode::<(u64, String, Vec<u8>)>(&bytes[..3]).is_err());
    }
}
