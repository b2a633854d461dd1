"""OpenID Connect bearer tokens for `cxr serve`, where a hospital has an identity provider:

    cxr serve RUN --host 0.0.0.0 --oidc-issuer https://idp.hospital/realms/radiology \
        --oidc-audience cxr --oidc-role-claim realm_access.roles

A token is a JWT the provider signed. It is accepted when its signature verifies against a key
of the issuer's JWKS (the `jwks_uri` of ISSUER/.well-known/openid-configuration, read at start;
keys are fetched again when a token names one not seen, so the provider may rotate them), with
an asymmetric algorithm (never `none` or a shared secret), and when its `iss`, `aud` and `exp`
say it is this issuer's, for this audience, still valid. Its role is then the highest of read <
annotate < admin named by the claim `role_claim` (a string or a list; a dotted path reaches a
nested claim, as Keycloak's `realm_access.roles`), after `role_map` (the provider's names ->
cxr's roles). A valid token naming no cxr role is no credential here (401, as a bad one).
"""
from __future__ import annotations

import json
import urllib.request

from ..errors import CxrError
from .auth import ROLES, Principal, Tokens

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class OidcVerifier:
    """`check(token)` -> the Principal of a valid JWT from `issuer`, or None."""

    def __init__(self, issuer: str, audience: str, role_claim: str = "roles",
                 role_map: dict[str, str] | None = None, timeout: float = 10.0):
        try:
            import jwt
        except ImportError:
            raise CxrError("OIDC needs PyJWT with its crypto extra: pip install 'cxr[service]'") from None
        self.issuer, self.audience, self.role_claim = issuer.rstrip("/"), audience, role_claim
        self.role_map = dict(role_map or {})
        bad = {v for v in self.role_map.values() if v not in ROLES}
        if bad:
            raise CxrError(f"--oidc-role maps to {', '.join(sorted(bad))}; roles are {', '.join(ROLES)}")
        discovery = f"{self.issuer}/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(discovery, timeout=timeout) as response:
                config = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise CxrError(f"cannot read the issuer's OpenID configuration ({exc})", discovery) from None
        if config.get("issuer", "").rstrip("/") != self.issuer or not config.get("jwks_uri"):
            raise CxrError("the OpenID configuration names another issuer or no jwks_uri", discovery)
        self._jwt = jwt
        self.keys = jwt.PyJWKClient(config["jwks_uri"], cache_keys=True, lifespan=300, timeout=int(timeout))

    def _role(self, claims: dict) -> str | None:
        value = claims
        for part in self.role_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        names = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
        roles = {self.role_map.get(str(n), str(n)) for n in names} & set(ROLES)
        return max(roles, key=ROLES.index) if roles else None

    def check(self, token: str) -> Principal | None:
        jwt = self._jwt
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError:  # bad signature, unknown key, expired, wrong issuer or audience...
            return None
        role = self._role(claims)
        if role is None:
            return None
        name = claims.get("preferred_username") or claims.get("email") or claims.get("sub") or "?"
        return Principal(f"oidc:{name}", role)


class Credentials:
    """The static tokens and, where configured, OIDC: a token is accepted by either. Empty
    (no tokens, no OIDC): open, as `Tokens()`."""

    def __init__(self, tokens: Tokens, oidc: OidcVerifier | None = None):
        self.tokens, self.oidc = tokens, oidc

    def __bool__(self) -> bool:
        return bool(self.tokens) or self.oidc is not None

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, token: str) -> Principal | None:
        found = self.tokens.check(token) if self.tokens else None
        if found is None and self.oidc is not None and token.count(".") == 2:
            found = self.oidc.check(token)
        return found
