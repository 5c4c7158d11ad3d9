//! The relay's own key: an ed25519 device secret (its TLS identity, which devices pin), kept in
//! [`RELAY_KEY_FILE`] in the data directory, readable by its owner only.
//!
//! The file is 64 bytes: the ed25519 secret key, then the X25519 secret key (unused by a relay,
//! kept so the file is a complete device secret). It is created on first start from 32 bytes of
//! OS randomness and written atomically (a temporary file, fsynced, then renamed).

use std::io::Write;
use std::path::Path;

use zeroize::Zeroizing;

use super::RelayError;
use crate::crypto::identity::DeviceSecret;
use crate::crypto::rng::SeedRng;

/// Name of the key file in the relay's data directory.
pub const RELAY_KEY_FILE: &str = "relay.key";

/// Length of the key file.
const KEY_FILE_LEN: usize = 64;

/// Loads the relay's key from `dir`, creating it (and `dir`) on first start.
pub(super) fn load_or_create(dir: &Path) -> Result<DeviceSecret, RelayError> {
    let path = dir.join(RELAY_KEY_FILE);
    let io_err = |source| RelayError::KeyFile {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let (Some(signing), Some(agreement)) = (
                bytes.get(..32).and_then(|b| <&[u8; 32]>::try_from(b).ok()),
                bytes.get(32..).and_then(|b| <&[u8; 32]>::try_from(b).ok()),
            ) else {
                return Err(RelayError::BadKeyFile {
                    path,
                    len: bytes.len(),
                    expected: KEY_FILE_LEN,
                });
            };
            Ok(DeviceSecret::from_secret_bytes(signing, agreement))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err)?;
            let mut seed = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut seed[..]).map_err(|e| RelayError::Randomness(e.to_string()))?;
            let secret = DeviceSecret::generate(&mut SeedRng::from_seed(*seed));
            write_key(dir, &path, &secret).map_err(io_err)?;
            tracing::info!(path = %path.display(), device = %secret.device_id(), "created the relay key");
            Ok(secret)
        }
        Err(e) => Err(io_err(e)),
    }
}

fn write_key(dir: &Path, path: &Path, secret: &DeviceSecret) -> std::io::Result<()> {
    let (signing, agreement) = secret.secret_bytes_for_storage();
    let mut bytes = Zeroizing::new([0u8; KEY_FILE_LEN]);
    bytes[..32].copy_from_slice(&signing[..]);
    bytes[32..].copy_from_slice(&agreement[..]);
    let tmp = dir.join(format!("{RELAY_KEY_FILE}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(&bytes[..])?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the directory is.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("relay");
        let first = load_or_create(&data).unwrap();
        let again = load_or_create(&data).unwrap();
        assert_eq!(first.device_id(), again.device_id());
        let path = data.join(RELAY_KEY_FILE);
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_FILE_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, [1u8; 10]).unwrap();
        assert!(matches!(
            load_or_create(&data),
            Err(RelayError::BadKeyFile { len: 10, .. })
        ));
    }
}
