//! The console's TLS identity: the operator's certificate and key, or a self-signed pair made
//! at first start and kept in the data folder, with the fingerprint staff compare in the
//! browser's warning.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Where the self-signed pair is kept, under the data folder.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let folder = data_dir.join("console");
    (folder.join("tls-cert.pem"), folder.join("tls-key.pem"))
}

/// The certificate and key files to use: the configured pair, or the generated one (made now
/// if missing, for `names`).
pub fn ensure_identity(
    configured: Option<(&Path, &Path)>,
    data_dir: &Path,
    names: &[String],
) -> Result<(PathBuf, PathBuf), String> {
    if let Some((cert, key)) = configured {
        return Ok((cert.to_path_buf(), key.to_path_buf()));
    }
    let (cert, key) = generated_paths(data_dir);
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let mut names = names.to_vec();
    names.push("localhost".into());
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| format!("cannot make a certificate: {e}"))?;
    let folder = cert.parent().expect("a folder");
    std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert, made.cert.pem().as_bytes())?;
    tracing::info!(cert = %cert.display(), "made a self-signed certificate for the console");
    Ok((cert, key))
}

/// Writes `bytes` to `path` through a temporary file, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let staged = path.with_extension("pem.new");
    std::fs::write(&staged, bytes).map_err(|e| format!("{}: {e}", staged.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", staged.display()))?;
    }
    std::fs::rename(&staged, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The first certificate in `cert`, as SHA-256 over its DER bytes, in the colon-separated hex
/// browsers show.
pub fn fingerprint(cert: &Path) -> Result<String, String> {
    let first = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate in the file", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let digest = Sha256::digest(first.as_ref());
    Ok(digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"))
}

/// A TLS server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ensure_identity(None, dir.path(), &["edge-7.site".into()]).unwrap();
        let first = fingerprint(&cert).unwrap();
        assert_eq!(first.len(), 32 * 3 - 1, "{first}");
        let again = ensure_identity(None, dir.path(), &[]).unwrap();
        assert_eq!(again, (cert.clone(), key.clone()));
        assert_eq!(fingerprint(&cert).unwrap(), first, "the same certificate at the next start");
        assert!(server_config(&cert, &key).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not pem").unwrap();
        let error = server_config(&cert, &cert).unwrap_err();
        assert!(error.contains("cert.pem"), "{error}");
        assert!(fingerprint(&dir.path().join("missing.pem")).unwrap_err().contains("missing.pem"));
    }
}
