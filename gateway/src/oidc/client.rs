//! Access tokens by the OAuth 2.0 client-credentials grant, found through
//! OIDC discovery with the `openidconnect` crate, and verified like any other
//! token before they are handed out.

use std::time::{Duration, SystemTime};

use openidconnect::core::{CoreClient, CoreClientAuthMethod, CoreProviderMetadata};
use openidconnect::{AuthType, ClientId, ClientSecret, IssuerUrl, OAuth2TokenResponse, Scope};

use super::{Claims, Secret, TrustedIssuer, Verifier, VerifyError, error_chain};

/// A confidential client of an OIDC provider that gets its own access tokens.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// The issuer URL; the token endpoint comes from its discovery document.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
    /// The audience the access token is for. Sent both as the RFC 8707
    /// `resource` parameter (oidc-provider, Keycloak, Entra's v2 resource
    /// style) and as `audience` (Auth0, Okta style); providers ignore the one
    /// they do not know.
    pub audience: Option<String>,
}

/// An access token and what its verification found.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token itself; the gateway acts on the verified claims and keeps
    /// the raw value only for callers that must present it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub raw: Secret,
    /// The earlier of the token's `exp` and the token response's
    /// `expires_in`.
    pub expires_at: SystemTime,
    pub claims: Claims,
}

impl Token {
    /// When to fetch a replacement: after 80 % of the token's lifetime as
    /// seen from `issued` (when it was fetched), so a refresh that fails can
    /// be retried before the old token expires.
    pub fn refresh_at(&self, issued: SystemTime) -> SystemTime {
        let lifetime = self
            .expires_at
            .duration_since(issued)
            .unwrap_or(Duration::ZERO);
        issued + lifetime.mul_f64(0.8)
    }
}

/// Why a token could not be acquired. Never contains the client secret or a
/// token.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("invalid client-credentials settings: {0}")]
    Config(String),
    #[error("OIDC discovery for {issuer} failed: {reason}")]
    Discovery { issuer: String, reason: String },
    #[error("token request to {issuer} as client `{client_id}` failed: {reason}")]
    TokenEndpoint {
        issuer: String,
        client_id: String,
        reason: String,
    },
    #[error("access token from {issuer} was refused: {source}")]
    Token {
        issuer: String,
        #[source]
        source: VerifyError,
    },
}

impl ClientCredentials {
    /// The trusted-issuer entry a [`Verifier`] needs to accept this client's
    /// tokens: this issuer, with the configured audience (or, when none is
    /// configured, the client id, which is what many providers put in `aud`).
    pub fn trusted_issuer(&self) -> TrustedIssuer {
        let audience = self
            .audience
            .clone()
            .unwrap_or_else(|| self.client_id.clone());
        TrustedIssuer::new(self.issuer.clone(), vec![audience])
    }

    /// Discover the provider, ask its token endpoint for an access token by
    /// the client-credentials grant, and verify it with `verifier` (which
    /// must trust this issuer — see [`Self::trusted_issuer`]). The access
    /// token must be a JWT.
    pub async fn fetch_token(&self, verifier: &Verifier) -> Result<Token, OidcError> {
        let http = verifier.http_client();
        let issuer_url = IssuerUrl::new(self.issuer.clone()).map_err(|e| {
            OidcError::Config(format!("issuer `{}` is not a URL: {e}", self.issuer))
        })?;
        let metadata = CoreProviderMetadata::discover_async(issuer_url, http)
            .await
            .map_err(|e| OidcError::Discovery {
                issuer: self.issuer.clone(),
                reason: error_chain(&e),
            })?;
        // Basic auth unless the provider only takes the secret in the body.
        let auth_type = match metadata.token_endpoint_auth_methods_supported() {
            Some(methods)
                if !methods.contains(&CoreClientAuthMethod::ClientSecretBasic)
                    && methods.contains(&CoreClientAuthMethod::ClientSecretPost) =>
            {
                AuthType::RequestBody
            }
            _ => AuthType::BasicAuth,
        };
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.client_id.clone()),
            Some(ClientSecret::new(self.client_secret.expose().to_owned())),
        )
        .set_auth_type(auth_type);

        let token_error = |reason: String| OidcError::TokenEndpoint {
            issuer: self.issuer.clone(),
            client_id: self.client_id.clone(),
            reason,
        };
        let mut request =
            client
                .exchange_client_credentials()
                .map_err(|e| OidcError::Discovery {
                    issuer: self.issuer.clone(),
                    reason: format!("the discovery document names no token endpoint ({e})"),
                })?;
        request = request.add_scopes(self.scopes.iter().cloned().map(Scope::new));
        if let Some(audience) = &self.audience {
            request = request
                .add_extra_param("resource", audience.clone())
                .add_extra_param("audience", audience.clone());
        }
        let fetched_at = SystemTime::now();
        let response = request.request_async(http).await.map_err(|e| {
            use openidconnect::RequestTokenError as E;
            token_error(match e {
                E::ServerResponse(r) => format!("the provider answered: {r}"),
                E::Request(e) => error_chain(&e),
                // Not the body: it could hold a token.
                E::Parse(e, _body) => format!("unparseable token response ({})", e.path()),
                E::Other(s) => s,
            })
        })?;

        let raw = response.access_token().secret().to_owned();
        let claims = verifier
            .verify(&raw)
            .await
            .map_err(|source| OidcError::Token {
                issuer: self.issuer.clone(),
                source,
            })?;
        let mut expires_at = claims.expires_at();
        if let Some(expires_in) = response.expires_in() {
            expires_at = expires_at.min(fetched_at + expires_in);
        }
        Ok(Token {
            raw: Secret::new(raw),
            expires_at,
            claims,
        })
    }
}
