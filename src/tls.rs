//! TLS pieces shared by the RouterOS API transport (`api-ssl` with `[transport]
//! api_tls_ca`) and the alert sender (`[alerts] ca_file`): loading CA certificate files
//! for rustls.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

/// Loads a PEM bundle of CA certificates for the API CA policy and the alerts.
pub fn load_ca_file(path: &Path) -> Result<Arc<RootCertStore>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: not usable as a CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(Arc::new(roots))
}
