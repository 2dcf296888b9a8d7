"""Access tokens: verify a JWT into :class:`Claims` and answer "may this user do X in
channel C?".

Tokens are JWTs (DESIGN.md, "Tokens and the command line") with a pinned algorithm:
HS256 with the server secret by default, or a public key for RS256/EdDSA (needs
``pyjwt[crypto]``). The token's parts and header are read here, and its claims checked
here, the same way for every algorithm; the signature is checked by the Rust extension
(ring) for HMAC, the common case and the one a connect storm pays for, and by pyjwt's
algorithms for public keys. Claims:

- ``sub``: the user id (required; see :func:`valid_user`).
- ``exp``: expiry, integer seconds since the epoch (required).
- ``scope``: a list of scope strings. Known ones (:data:`KNOWN_SCOPES`) are kept; unknown
  strings are ignored, so a newer issuer can add scopes without locking out older servers.
  Absent means no scopes.
- ``channels``: a list of glob patterns (:func:`fnmatch.fnmatchcase`: ``*``, ``?``,
  ``[...]``, always case-sensitive) naming the channels the user may use. Absent means
  none: the user can still use the DM channels they belong to.
- ``aud`` / ``iss``: checked when the verifier is configured with them; a token that
  carries an ``aud`` is rejected by a verifier without one. ``nbf`` is honoured.

Direct-message channels are named ``dm:<a>:<b>`` with ``a < b``, both valid user ids.
The whole ``dm:`` namespace is reserved: such a channel is open to exactly its two users
and never through a pattern, so ``channels=["*"]`` does not let a third user into
someone else's DM, and a malformed ``dm:`` name is open to nobody.

This module does no I/O (key material is passed in as bytes) and keeps no clock: the
caller passes ``now`` in seconds, so expiry is tested deterministically.

Errors: :class:`AuthError` carries a stable wire code (``token_expired`` or
``unauthorized``) for anything wrong with a token from the network; ``ValueError`` is
local misuse (a short secret, a private key where a public one belongs, bad issue
arguments).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jwt

from tsmsg._native import HmacJwt, MalformedJws, jws_parts

__all__ = [
    "DEFAULT_MAX_LIFETIME_S",
    "DM_PREFIX",
    "KNOWN_SCOPES",
    "MAX_CHANNEL_CHARS",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "MAX_SECRETS",
    "MAX_TOKEN_CHARS",
    "MAX_USER_CHARS",
    "MIN_SECRET_BYTES",
    "SCOPE_MODERATE",
    "SCOPE_READ",
    "SCOPE_SEND",
    "SECRET_ENV",
    "SECRET_PREVIOUS_ENV",
    "TOKEN_EXPIRED",
    "UNAUTHORIZED",
    "AuthError",
    "Claims",
    "TokenIssuer",
    "TokenVerifier",
    "dm_channel",
    "generate_dev_secret",
    "parse_dm",
    "parse_secrets",
    "previous_secret_from_env",
    "secret_from_env",
    "signing_secret",
    "valid_channel",
    "valid_user",
]

# --- limits -------------------------------------------------------------------------------

MAX_CHANNEL_CHARS: Final = 128  # matches the store's MAX_CHANNEL_BYTES (names are ASCII)
DM_PREFIX: Final = "dm:"  # reserved namespace for direct-message channels
# Derived, not chosen: the longest DM name, dm:<user>:<user>, must fit in a channel name.
MAX_USER_CHARS: Final = (MAX_CHANNEL_CHARS - len(DM_PREFIX) - 1) // 2  # = 62
MAX_PATTERNS: Final = 64  # bounds per-request matching work and the claims kept per session
# Verified tokens a TokenVerifier remembers: a reconnect storm of known devices costs no
# signature checks. Tokens over VERIFIED_CACHE_TOKEN_CHARS are verified every time, so an
# entry is at most ~2 KB of token and its claims (a typical one ~0.5 KB; plus the claims'
# access answers, ACCESS_CACHE_MAX names): a few MB in all.
VERIFIED_CACHE_MAX: Final = 4096
VERIFIED_CACHE_TOKEN_CHARS: Final = 1024
ACCESS_CACHE_MAX: Final = 64  # channels whose access a Claims remembers (cleared when full)
MAX_PATTERN_CHARS: Final = 256  # a bracket class spends several characters per channel char
MAX_TOKEN_CHARS: Final = 8 * 1024  # checked before decoding: no parsing of huge inputs
MIN_SECRET_BYTES: Final = 32  # RFC 7518 3.2: an HS256 key at least as long as its hash
# The furthest ahead a token's exp may lie (the server's token_max_lifetime_s): a token
# that never expires cannot be revoked by waiting, and an exp beyond 2**63 would not even
# fit the wire's integers when echoed (refresh's ok).
DEFAULT_MAX_LIFETIME_S: Final = 30 * 86_400

# No ':' in user ids, so a DM name splits unambiguously into its two users.
_USER_RE: Final = re.compile(rf"[A-Za-z0-9_.@-]{{1,{MAX_USER_CHARS}}}")
# Channel names: the user-id charset plus ':' (namespaces such as dm:). ASCII only, so
# characters and bytes agree and no two names differ only by Unicode normalisation.
_CHANNEL_RE: Final = re.compile(rf"[A-Za-z0-9_.:@-]{{1,{MAX_CHANNEL_CHARS}}}")
# Patterns: the channel charset plus the fnmatch metacharacters * ? [ ] !
_PATTERN_RE: Final = re.compile(rf"[A-Za-z0-9_.:@*?\[\]!-]{{1,{MAX_PATTERN_CHARS}}}")

# --- scopes and codes ---------------------------------------------------------------------

SCOPE_READ: Final = "chat:read"
SCOPE_SEND: Final = "chat:send"
SCOPE_MODERATE: Final = "chat:moderate"  # change other users' messages; implies nothing else
KNOWN_SCOPES: Final = frozenset({SCOPE_READ, SCOPE_SEND, SCOPE_MODERATE})
# Each subset of KNOWN_SCOPES once: a session's Claims share it (at most 8 entries).
_SCOPE_SETS: dict[frozenset[str], frozenset[str]] = {}

TOKEN_EXPIRED: Final = "token_expired"
UNAUTHORIZED: Final = "unauthorized"
AuthCode = Literal["token_expired", "unauthorized"]

SECRET_ENV: Final = "TSMSG_SECRET"
# During a secret rotation: the previous secret, still accepted for verification only.
SECRET_PREVIOUS_ENV: Final = "TSMSG_SECRET_PREVIOUS"
MAX_SECRETS: Final = 8  # a secret file's lines; each bad-signature token costs one HMAC per secret

# HMAC key minimum per algorithm: the hash output size (RFC 7518 3.2).
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
_ASYMMETRIC: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class AuthError(Exception):
    """A token was refused. ``code`` is the stable wire error code; ``message`` is safe to
    send to the client (it never contains the token)."""

    def __init__(self, code: AuthCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: AuthCode = code
        self.message = message


# --- names --------------------------------------------------------------------------------


def valid_user(s: object) -> bool:
    """A user id: 1..MAX_USER_CHARS characters of ``[A-Za-z0-9_.@-]``."""
    return isinstance(s, str) and _USER_RE.fullmatch(s) is not None


def valid_channel(s: object) -> bool:
    """A channel name: 1..MAX_CHANNEL_CHARS characters of ``[A-Za-z0-9_.:@-]``. A valid
    name in the reserved ``dm:`` namespace may still be no valid DM (see :func:`parse_dm`);
    such a channel is open to nobody."""
    return isinstance(s, str) and _CHANNEL_RE.fullmatch(s) is not None


def _valid_pattern(s: object) -> bool:
    return isinstance(s, str) and _PATTERN_RE.fullmatch(s) is not None


def dm_channel(a: str, b: str) -> str:
    """The DM channel of users ``a`` and ``b`` (in either order). Raises ``ValueError`` for
    an invalid user id or ``a == b``."""
    for user in (a, b):
        if not valid_user(user):
            raise ValueError(f"invalid user id {user!r} (1..{MAX_USER_CHARS} of [A-Za-z0-9_.@-])")
    if a == b:
        raise ValueError("a DM channel needs two distinct users")
    lo, hi = sorted((a, b))
    return f"{DM_PREFIX}{lo}:{hi}"


def parse_dm(name: str) -> tuple[str, str] | None:
    """The two users of a well-formed DM channel name (``dm:<a>:<b>``, ``a < b``, both valid
    user ids), else ``None``. ``dm:bob:alice`` and ``dm:alice:alice`` are not DM names."""
    if not name.startswith(DM_PREFIX):
        return None
    parts = name[len(DM_PREFIX) :].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (valid_user(a) and valid_user(b) and a < b):
        return None
    return a, b


# --- claims -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token allows. Build one with :meth:`TokenVerifier.verify`."""

    user: str
    exp: int
    scopes: frozenset[str]
    channels: tuple[str, ...]
    # may_access's answers so far (at most ACCESS_CACHE_MAX): a send does not match the
    # token's patterns again. The claims never change, so neither do the answers.
    _access: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def may_access(self, channel: str) -> bool:
        """True when the channel is this user's DM, or a non-DM channel matching one of the
        patterns. Names in the ``dm:`` namespace never match through patterns."""
        known = self._access.get(channel)
        if known is not None:
            return known
        if not valid_channel(channel):
            return False
        if channel.startswith(DM_PREFIX):
            users = parse_dm(channel)
            allowed = users is not None and self.user in users
        else:
            allowed = any(fnmatch.fnmatchcase(channel, p) for p in self.channels)
        if len(self._access) >= ACCESS_CACHE_MAX:
            self._access.clear()
        self._access[channel] = allowed
        return allowed

    def may_read(self, channel: str) -> bool:
        """Join, sync, history, read cursor and typing: scope ``chat:read`` and access."""
        return SCOPE_READ in self.scopes and self.may_access(channel)

    def may_send(self, channel: str) -> bool:
        """Send, and edit or delete one's own messages: scope ``chat:send`` and access."""
        return SCOPE_SEND in self.scopes and self.may_access(channel)

    def may_moderate(self, channel: str) -> bool:
        """Edit or delete other users' messages: scope ``chat:moderate`` and access."""
        return SCOPE_MODERATE in self.scopes and self.may_access(channel)


# --- keys ---------------------------------------------------------------------------------


def _is_hmac(algorithm: str) -> bool:
    """Whether ``algorithm`` is an HMAC one; ``ValueError`` if it is not supported at all
    (``none`` among them)."""
    if algorithm in _HMAC_MIN_BYTES:
        return True
    if algorithm in _ASYMMETRIC:
        return False
    supported = ", ".join(sorted([*_HMAC_MIN_BYTES, *_ASYMMETRIC]))
    raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {supported}")


def _prepare_key(algorithm: str, key: bytes, *, private: bool) -> Any:
    """Parse ``key`` for ``algorithm`` once, at construction, so a bad key fails at
    startup rather than on the first token. Returns what pyjwt takes as a key."""
    symmetric = _is_hmac(algorithm)
    if symmetric and len(key) < _HMAC_MIN_BYTES[algorithm]:
        minimum = _HMAC_MIN_BYTES[algorithm]
        raise ValueError(f"{algorithm} secret must be at least {minimum} bytes, got {len(key)}")
    try:
        alg = jwt.get_algorithm_by_name(algorithm)
    except NotImplementedError:
        raise ValueError(
            f"algorithm {algorithm} needs the cryptography package (pip install 'pyjwt[crypto]')"
        ) from None
    try:
        prepared = alg.prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as e:
        raise ValueError(f"unusable {algorithm} key: {e}") from None
    if not symmetric:
        # cryptography's private key classes have public_key(); its public ones do not.
        is_private = callable(getattr(prepared, "public_key", None))
        if is_private != private:
            want = "a private" if private else "a public"
            raise ValueError(f"{algorithm} needs {want} key (PEM)")
    return prepared


# --- verification -------------------------------------------------------------------------


class TokenVerifier:
    """Turns a token into :class:`Claims` or raises :class:`AuthError`.

    The algorithm is pinned: a token whose header names any other ``alg`` (``none``, HS384,
    HS256 against an RS256 verifier, ...) is refused before its claims are read. With an
    HMAC algorithm, ``secret`` verifies and ``extra_secrets`` verify too, so during a secret
    rotation tokens signed with the old and the new secret are both accepted.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        public_key: bytes | None = None,
        algorithm: str = "HS256",
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: int = 0,
        extra_secrets: Sequence[bytes] = (),
        max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
    ) -> None:
        # What checks a signature: the extension for HMAC (the secrets, the current one
        # first), pyjwt's algorithm with the parsed public key otherwise.
        self._hmac: HmacJwt | None = None
        self._public: tuple[Any, Any] | None = None  # (pyjwt's algorithm, the key)
        if _is_hmac(algorithm):
            if secret is None or public_key is not None:
                raise ValueError(f"{algorithm} verifies with a secret, not a public key")
            secrets = [secret, *extra_secrets]
            for key in secrets:
                _prepare_key(algorithm, key, private=False)  # the length check
            self._hmac = HmacJwt(algorithm, secrets)
        else:
            if public_key is None or secret is not None or extra_secrets:
                raise ValueError(f"{algorithm} verifies with public_key, not a secret")
            key = _prepare_key(algorithm, public_key, private=False)
            self._public = (jwt.get_algorithm_by_name(algorithm), key)
        if leeway_s < 0:
            raise ValueError(f"leeway_s must be >= 0, got {leeway_s}")
        if max_lifetime_s < 1:
            raise ValueError(f"max_lifetime_s must be >= 1, got {max_lifetime_s}")
        self.max_lifetime_s = max_lifetime_s
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        # token -> (its claims, its nbf): tokens that verified, the oldest dropped first
        self._verified: dict[str, tuple[Claims, int | None]] = {}

    def verify(self, token: str, now: int) -> Claims:
        """Verify ``token`` at time ``now`` (seconds since the epoch). A token verified
        before is not decoded again (a reconnecting device presents the same one): its
        claims come from a bounded cache keyed by the token's text, with its time checks
        made again at ``now``."""
        known = self._verified.get(token) if type(token) is str else None
        if known is not None:
            claims, nbf = known
            self._check_times(claims.exp, nbf, now)
            return claims
        payload = self._decode(token)
        exp = _claim_int(payload, "exp")
        nbf = _claim_int(payload, "nbf") if "nbf" in payload else None
        self._check_times(exp, nbf, now)
        claims = self._claims(payload, exp)
        if len(token) <= VERIFIED_CACHE_TOKEN_CHARS:
            if len(self._verified) >= VERIFIED_CACHE_MAX:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = (claims, nbf)
        return claims

    def _check_times(self, exp: int, nbf: int | None, now: int) -> None:
        # pyjwt's own time checks read the wall clock; ours use the ``now`` passed in.
        if exp <= now - self.leeway_s:
            raise AuthError(TOKEN_EXPIRED, "token has expired")
        if exp > now + self.max_lifetime_s + self.leeway_s:
            raise AuthError(
                UNAUTHORIZED,
                f"token expires too far ahead: 'exp' is more than {self.max_lifetime_s} s "
                "from now (the server's token_max_lifetime_s)",
            )
        if nbf is not None and nbf > now + self.leeway_s:
            raise AuthError(UNAUTHORIZED, "token is not valid yet (nbf)")

    def _claims(self, payload: dict[str, Any], exp: int) -> Claims:
        user = payload["sub"]
        if not valid_user(user):
            raise AuthError(
                UNAUTHORIZED,
                f"claim 'sub' is not a valid user id (1..{MAX_USER_CHARS} of [A-Za-z0-9_.@-])",
            )
        scopes = _claim_str_list(payload, "scope")
        patterns = _claim_str_list(payload, "channels")
        if len(patterns) > MAX_PATTERNS:
            raise AuthError(
                UNAUTHORIZED, f"claim 'channels' has {len(patterns)} patterns, max {MAX_PATTERNS}"
            )
        if not all(_valid_pattern(p) for p in patterns):
            raise AuthError(
                UNAUTHORIZED,
                f"claim 'channels' holds an invalid pattern (1..{MAX_PATTERN_CHARS} of "
                "[A-Za-z0-9_.:@-] and *?[]!)",
            )
        return Claims(
            user=user,
            exp=exp,
            scopes=_SCOPE_SETS.setdefault(known := frozenset(scopes) & KNOWN_SCOPES, known),
            channels=tuple(patterns),
        )

    def _decode(self, token: str) -> dict[str, Any]:
        """The payload of a token whose shape, algorithm and signature check out, with its
        registered claims checked (:meth:`_registered`)."""
        if not isinstance(token, str):
            raise AuthError(UNAUTHORIZED, "token must be a string")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(UNAUTHORIZED, f"token is longer than {MAX_TOKEN_CHARS} characters")
        if not token.isascii():
            raise AuthError(UNAUTHORIZED, "malformed token (not ASCII)")
        payload = _json(self._signed_payload(token))
        if not isinstance(payload, dict):
            raise AuthError(UNAUTHORIZED, "malformed token")
        self._registered(payload)
        return payload

    def _signed_payload(self, token: str) -> bytes:
        """The payload's JSON text of a token (JWS compact form, RFC 7515) whose header
        names this verifier's algorithm and no extension, and whose signature checks out:
        by the extension for HMAC, by pyjwt's algorithm for a public key. The parts are
        read here, the same way for both (PROTOCOL.md 5.1)."""
        try:
            header_json, payload, signature = jws_parts(token)
        except MalformedJws:
            raise AuthError(UNAUTHORIZED, "malformed token") from None
        header = _json(header_json)
        if not isinstance(header, dict):
            raise AuthError(UNAUTHORIZED, "malformed token")
        if header.get("alg") != self.algorithm:  # `none`, another algorithm, no alg
            accepts = f"this server accepts {self.algorithm}"
            raise AuthError(UNAUTHORIZED, f"token algorithm is not allowed ({accepts})")
        if "crit" in header or header.get("b64", True) is not True:
            # RFC 7515 4.1.11: an extension a verifier does not know refuses the token;
            # b64 false (RFC 7797, a payload not encoded) is one.
            raise AuthError(UNAUTHORIZED, "malformed token (a JWS extension, not supported)")
        signing_input = token[: token.rindex(".")].encode()
        if self._hmac is not None:
            valid = self._hmac.verify(signing_input, signature)
        else:
            assert self._public is not None
            algorithm, key = self._public
            valid = algorithm.verify(signing_input, key, signature)  # any bytes: a bool
        if not valid:
            raise AuthError(UNAUTHORIZED, "token signature is invalid")
        return payload

    def _registered(self, payload: dict[str, Any]) -> None:
        """RFC 7519's claims this server reads or checks: ``sub`` and ``exp`` required,
        ``jti`` a string if present, ``aud`` and ``iss`` as configured (a token that names
        an audience is refused by a verifier without one). Their values' own checks are
        :meth:`verify`'s; ``iat`` and claims this server does not know are ignored."""
        for name in ("sub", "exp"):
            if payload.get(name) is None:
                raise AuthError(UNAUTHORIZED, f"token lacks the required claim {name!r}")
        if not isinstance(payload["sub"], str):
            raise AuthError(UNAUTHORIZED, "claim 'sub' must be a string")
        if not isinstance(payload.get("jti", ""), str):
            raise AuthError(UNAUTHORIZED, "claim 'jti' must be a string")
        if self.audience is None:
            if "aud" in payload:
                raise AuthError(UNAUTHORIZED, "token audience does not match this server")
        elif payload.get("aud") is None:
            raise AuthError(UNAUTHORIZED, "token lacks the required claim 'aud'")
        else:
            aud = payload["aud"]
            audiences = [aud] if isinstance(aud, str) else aud
            if not (
                isinstance(audiences, list)
                and all(isinstance(a, str) for a in audiences)
                and self.audience in audiences
            ):
                raise AuthError(UNAUTHORIZED, "token audience does not match this server")
        if self.issuer is not None:
            if payload.get("iss") is None:
                raise AuthError(UNAUTHORIZED, "token lacks the required claim 'iss'")
            if payload["iss"] != self.issuer:  # equal, not a substring (CVE-2024-53861)
                raise AuthError(UNAUTHORIZED, "token issuer is not accepted")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of a token's header or payload, refused (ValueError) if it names a
    member twice: two parsers that disagree on which ``sub`` counts are an old way in (RFC
    7519 4)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a name twice")
    return obj


# Strict JSON for a token's header and payload: made once (json.loads with hooks would
# build one per call).
_STRICT_JSON: Final = json.JSONDecoder(object_pairs_hook=_unique_names, parse_constant=_not_json)


def _json(text: bytes) -> Any:
    """A token part's JSON (RFC 8259, strictly: no name twice in an object, no NaN), or
    AuthError; nesting too deep for the parser is malformed too."""
    try:
        return _STRICT_JSON.decode(text.decode())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a name twice, too deep
        raise AuthError(UNAUTHORIZED, "malformed token") from None


def _claim_int(payload: Mapping[str, Any], name: str) -> int:
    value = payload.get(name)
    # bool is an int subclass; true is no timestamp.
    if not isinstance(value, int) or isinstance(value, bool):
        raise AuthError(UNAUTHORIZED, f"claim {name!r} must be an integer (seconds)")
    return value


def _claim_str_list(payload: Mapping[str, Any], name: str) -> list[str]:
    """An optional list-of-strings claim; absent means empty."""
    value = payload.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError(UNAUTHORIZED, f"claim {name!r} must be a list of strings")
    return value


# --- issuing ------------------------------------------------------------------------------


class TokenIssuer:
    """Signs tokens: used by ``tsmsg token`` and by tests. ``secret`` is the HMAC secret,
    or a private key (PEM) for an asymmetric algorithm."""

    def __init__(self, secret: bytes, algorithm: str = "HS256") -> None:
        self._key: Any = _prepare_key(algorithm, secret, private=True)
        self.algorithm = algorithm

    def issue(
        self,
        user: str,
        channels: Iterable[str] = (),
        scopes: Iterable[str] = (SCOPE_READ, SCOPE_SEND),
        ttl_s: int = 3600,
        *,
        now: int,
        audience: str | None = None,
        issuer: str | None = None,
        max_ttl_s: int = DEFAULT_MAX_LIFETIME_S,
    ) -> str:
        """A token for ``user`` valid from ``now`` for ``ttl_s`` seconds, at most
        ``max_ttl_s`` (the verifying server's token_max_lifetime_s).

        ``channels`` defaults to none, so a token grants only the user's DMs unless
        channels are named (the CLI's ``--channels``); ``("*",)`` grants every non-DM
        channel. Raises ``ValueError`` for arguments the verifier would refuse, including
        unknown scopes (most likely a typo here, although verifiers ignore them).
        """
        channels = list(channels)
        scope_list = sorted(set(scopes))
        if not valid_user(user):
            raise ValueError(f"invalid user id {user!r} (1..{MAX_USER_CHARS} of [A-Za-z0-9_.@-])")
        if len(channels) > MAX_PATTERNS:
            raise ValueError(f"{len(channels)} channel patterns, max {MAX_PATTERNS}")
        for p in channels:
            if not _valid_pattern(p):
                raise ValueError(
                    f"invalid channel pattern {p!r} (1..{MAX_PATTERN_CHARS} of "
                    "[A-Za-z0-9_.:@-] and *?[]!)"
                )
        unknown = set(scope_list) - KNOWN_SCOPES
        if unknown:
            raise ValueError(
                f"unknown scopes {sorted(unknown)}; known: {', '.join(sorted(KNOWN_SCOPES))}"
            )
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if ttl_s > max_ttl_s:
            raise ValueError(
                f"ttl_s {ttl_s} is over the servers' token_max_lifetime_s ({max_ttl_s} s): "
                "they would refuse the token"
            )
        payload: dict[str, Any] = {
            "sub": user,
            "iat": now,
            "exp": now + ttl_s,
            "scope": scope_list,
            "channels": channels,
        }
        if audience is not None:
            payload["aud"] = audience
        if issuer is not None:
            payload["iss"] = issuer
        token = jwt.encode(payload, self._key, algorithm=self.algorithm)
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"token is {len(token)} characters, max {MAX_TOKEN_CHARS}")
        return token


# --- secrets ------------------------------------------------------------------------------


def secret_from_env(env: Mapping[str, str] = os.environ) -> bytes | None:
    """The HMAC secret from ``TSMSG_SECRET`` (UTF-8), or ``None`` when it is unset.
    Raises ``ValueError`` for a secret shorter than MIN_SECRET_BYTES."""
    return _env_secret(SECRET_ENV, env.get(SECRET_ENV))


def signing_secret(secret_file: str, env: Mapping[str, str] = os.environ) -> bytes | None:
    """The secret to sign tokens with, as an app or script next to a server finds it:
    ``TSMSG_SECRET`` if set, else the current (first) secret of ``secret_file`` if that
    file exists (e.g. ``data/dev-secret``, which ``serve --dev`` keeps); else ``None``."""
    secret = secret_from_env(env)
    if secret is None and os.path.isfile(secret_file):
        with open(secret_file, "rb") as fh:
            secret = parse_secrets(fh.read(), f"secret file {secret_file}")[0]
    return secret


def previous_secret_from_env(env: Mapping[str, str] = os.environ) -> bytes | None:
    """The previous HMAC secret from ``TSMSG_SECRET_PREVIOUS`` (UTF-8), accepted only to
    verify during a rotation; ``None`` when it is unset or empty. Raises ``ValueError``
    for a secret shorter than MIN_SECRET_BYTES."""
    return _env_secret(SECRET_PREVIOUS_ENV, env.get(SECRET_PREVIOUS_ENV) or None)


def _env_secret(name: str, value: str | None) -> bytes | None:
    if value is None:
        return None
    secret = value.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{name} must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return secret


def parse_secrets(data: bytes, source: str) -> tuple[bytes, ...]:
    """The secrets of a secret file's contents, the current one first.

    One secret per line: the first is the current secret (``tsmsg token`` signs with it),
    the others are previous secrets that still verify during a rotation. Whitespace
    around each line (a trailing ``\\r`` too) is not part of the secret; blank lines and
    lines starting with ``#`` are skipped. ``ValueError`` names ``source`` and the line
    number, never a secret: no secret at all, more than MAX_SECRETS, or one shorter than
    MIN_SECRET_BYTES."""
    found: list[bytes] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) < MIN_SECRET_BYTES:
            raise ValueError(
                f"{source}, line {n}: a secret must be at least {MIN_SECRET_BYTES} bytes, "
                f"got {len(line)}"
            )
        found.append(line)
    if not found:
        raise ValueError(f"{source} holds no secret (one per line, the current one first)")
    if len(found) > MAX_SECRETS:
        raise ValueError(f"{source} holds {len(found)} secrets, at most {MAX_SECRETS}")
    return tuple(found)


def generate_dev_secret() -> bytes:
    """A random secret for development (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32).encode("ascii")
