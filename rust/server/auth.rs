//! Who calls and what they may do (docs/security.md): the server's TLS set-up, and the
//! enforcement of the policy `meshstore.security` defines (which identity has which
//! roles, which roles may call which method) on the authentication hook, before any
//! handler runs. The policy itself is data handed over at start: one definition, in
//! Python, for the gRPC and the HTTP side.
//!
//! A caller is identified by its bearer token (`authorization: Bearer <token>`, looked
//! up by SHA-256: the server never holds the tokens themselves) or else by its verified
//! client certificate (common name, else first DNS name). The role `admin` may call
//! every method.
use super::rpc::{Authorize, Caller};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tonic::Status;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const ADMIN: &str = "admin";

/// The server's certificate chain and key (PEM) and, for mutual TLS, the CA (PEM) client
/// certificates are verified against.
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
    /// With a CA: a client may still connect without a certificate (it then needs a
    /// bearer token). Without it, the handshake refuses such a client.
    pub client_cert_optional: bool,
}

impl Tls {
    pub(crate) fn config(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca)).client_auth_optional(self.client_cert_optional);
        }
        config
    }
}

pub struct Policy {
    /// Per full method path (`/store.v1.EntityStoreService/GetEntity`), the roles that
    /// may call it. A method not listed needs `admin`.
    pub methods: HashMap<String, BTreeSet<String>>,
    /// Per identity, its roles.
    pub identities: HashMap<String, BTreeSet<String>>,
    /// Per SHA-256 of a bearer token (lower-case hex), the identity it stands for.
    pub tokens: HashMap<String, String>,
}

impl Policy {
    /// The hook that enforces this policy; it hands the caller's identity on to the
    /// handlers (an approval records who decided).
    pub fn into_authorize(self) -> Authorize {
        Arc::new(move |caller| self.check(caller).map(Some))
    }

    /// The caller's identity if its roles allow the method; UNAUTHENTICATED if it cannot
    /// be told who calls, PERMISSION_DENIED if its roles do not allow the method.
    pub fn check(&self, caller: &Caller<'_>) -> Result<String, Status> {
        let name = self.identify(caller)?;
        let none = BTreeSet::new();
        let has = self.identities.get(&name).unwrap_or(&none);
        let needs = self.methods.get(caller.method).unwrap_or(&none);
        if has.contains(ADMIN) || !has.is_disjoint(needs) {
            return Ok(name);
        }
        let method = caller.method.rsplit('/').next().unwrap_or_default();
        let needs = if needs.is_empty() { ADMIN.to_string() } else { join(needs.iter().chain([&ADMIN.to_string()])) };
        let has = if has.is_empty() { "no role".to_string() } else { format!("roles {}", join(has.iter())) };
        Err(Status::permission_denied(format!("'{name}' may not call {method}: it needs the role {needs} and has {has}")))
    }

    fn identify(&self, caller: &Caller<'_>) -> Result<String, Status> {
        if let Some(value) = caller.headers.get(http::header::AUTHORIZATION) {
            // Never echo the header: it is a secret.
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
            let Some(token) = token.filter(|t| !t.is_empty()) else {
                return Err(Status::unauthenticated("the authorization header is not 'Bearer <token>'"));
            };
            return self.tokens.get(&sha256_hex(token)).cloned().ok_or_else(|| Status::unauthenticated("unknown bearer token"));
        }
        match caller.certificate {
            Some(der) => known_certificate_name(der)
                .ok_or_else(|| Status::unauthenticated("the client certificate names no one (no common name, no DNS name)")),
            None => Err(Status::unauthenticated(
                "this server needs a client certificate or an 'authorization: Bearer <token>' header",
            )),
        }
    }
}

fn join<'a>(roles: impl Iterator<Item = &'a String>) -> String {
    roles.map(String::as_str).collect::<Vec<_>>().join(" or ")
}

/// Certificates whose names were read, by their DER bytes: every call of a connection
/// shows the same certificate, and parsing it each time would cost more than the call.
/// Bounded: forgotten whole when full.
static NAMES: std::sync::LazyLock<parking_lot::Mutex<HashMap<Vec<u8>, Option<String>>>> =
    std::sync::LazyLock::new(Default::default);
const NAMES_KEPT: usize = 1024;

/// `certificate_name`, read once per certificate.
fn known_certificate_name(der: &[u8]) -> Option<String> {
    if let Some(name) = NAMES.lock().get(der) {
        return name.clone();
    }
    let name = certificate_name(der);
    let mut names = NAMES.lock();
    if names.len() >= NAMES_KEPT {
        names.clear();
    }
    names.insert(der.to_vec(), name.clone());
    name
}

/// The identity a client certificate (DER) names: its subject's common name, else its
/// first DNS subject alternative name.
pub fn certificate_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}

/// SHA-256 of a token's UTF-8 bytes, lower-case hex (as `meshstore token hash` prints).
pub fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
