//! A development certificate authority for local alliances, demos and tests (`fedq certs`):
//! one CA and one certificate per identity, each valid for both TLS server and client use, with
//! the identity as DNS name (plus `localhost` and 127.0.0.1, so loopback addresses verify).
//! Production alliances issue certificates from their own CA instead (see README).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::CoordinatorError;

/// Paths of one issued identity.
#[derive(Debug, Clone)]
pub struct IssuedIdentity {
    pub identity: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`create_dev_pki`] wrote.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub identities: Vec<IssuedIdentity>,
}

fn cert_error(err: rcgen::Error) -> CoordinatorError {
    CoordinatorError::Certificates(err.to_string())
}

/// Creates a new CA named `ca_name` in `out_dir` and issues a certificate for each identity.
/// Refuses to overwrite existing files.
pub fn create_dev_pki(
    out_dir: &Path,
    ca_name: &str,
    identities: &[String],
) -> Result<DevPki, CoordinatorError> {
    create_dev_pki_with(out_dir, ca_name, identities, &Issue::default())
}

/// A calendar day (year, month, day), UTC.
pub type Day = (i32, u8, u8);

/// How the identities' certificates are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issue {
    /// Valid only from the first to the second day (for example already expired, to rehearse
    /// what a node does with one); by default a year from now.
    pub validity: Option<(Day, Day)>,
    /// Allow client authentication as well as server authentication (the default; a node in
    /// outbound mode and the coordinator need it).
    pub client_auth: bool,
}

impl Default for Issue {
    fn default() -> Issue {
        Issue {
            validity: None,
            client_auth: true,
        }
    }
}

/// Like [`create_dev_pki`], with the identities' certificates issued as `issue` says.
pub fn create_dev_pki_with(
    out_dir: &Path,
    ca_name: &str,
    identities: &[String],
    issue: &Issue,
) -> Result<DevPki, CoordinatorError> {
    std::fs::create_dir_all(out_dir).map_err(|err| {
        CoordinatorError::Certificates(format!("cannot create {}: {err}", out_dir.display()))
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(cert_error)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_error)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let ca_cert_path = out_dir.join("ca.pem");
    write_new(&ca_cert_path, &ca_pem, false)?;
    write_new(&out_dir.join("ca.key"), &ca_key_pem, true)?;

    let mut issued = Vec::new();
    for identity in identities {
        let names = vec![
            identity.clone(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        let mut params = CertificateParams::new(names).map_err(cert_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if issue.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if let Some(((from_y, from_m, from_d), (until_y, until_m, until_d))) = issue.validity {
            params.not_before = rcgen::date_time_ymd(from_y, from_m, from_d);
            params.not_after = rcgen::date_time_ymd(until_y, until_m, until_d);
        }
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
        let cert_path = out_dir.join(format!("{identity}.pem"));
        let key_path = out_dir.join(format!("{identity}.key"));
        write_new(&cert_path, &cert.pem(), false)?;
        write_new(&key_path, &key.serialize_pem(), true)?;
        issued.push(IssuedIdentity {
            identity: identity.clone(),
            cert: cert_path,
            key: key_path,
        });
    }
    Ok(DevPki {
        ca_cert: ca_cert_path,
        identities: issued,
    })
}

/// Writes a new file (never overwrites); `private` files are readable by their owner only.
pub(crate) fn write_new(
    path: &Path,
    contents: &str,
    private: bool,
) -> Result<(), CoordinatorError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|err| {
        CoordinatorError::Certificates(format!(
            "cannot create {} (it must not exist yet): {err}",
            path.display()
        ))
    })?;
    file.write_all(contents.as_bytes()).map_err(|err| {
        CoordinatorError::Certificates(format!("cannot write {}: {err}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = create_dev_pki(dir.path(), "test CA", &["site-a.fedq.test".into()]).unwrap();
        let certs = fedq_proto::tls::load_certs(&pki.identities[0].cert).unwrap();
        let names = fedq_proto::tls::certificate_identities(&certs[0]).unwrap();
        assert!(names.contains(&"site-a.fedq.test".to_string()), "{names:?}");
        let again = create_dev_pki(dir.path(), "test CA", &[])
            .unwrap_err()
            .to_string();
        assert!(again.contains("must not exist yet"), "{again}");
    }
}
