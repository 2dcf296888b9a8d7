"""Tokens and authorization (tsmsg.auth): plain calls, time passed in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsmsg import auth
from tsmsg.auth import (
    DEFAULT_MAX_LIFETIME_S,
    MAX_PATTERNS,
    MAX_TOKEN_CHARS,
    MAX_USER_CHARS,
    SCOPE_MODERATE,
    SCOPE_READ,
    SCOPE_SEND,
    AuthError,
    Claims,
    TokenIssuer,
    TokenVerifier,
    dm_channel,
    generate_dev_secret,
    parse_dm,
    secret_from_env,
    signing_secret,
    valid_channel,
    valid_user,
)

NOW = 1_700_000_000
SECRET = b"test-secret-0123456789abcdef-0001"
OLD_SECRET = b"test-secret-0123456789abcdef-old0"
OTHER_SECRET = b"test-secret-0123456789abcdef-evil"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(
    payload: dict[str, Any],
    key: bytes | None = SECRET,
    alg: str = "HS256",
    digest: Any = hashlib.sha256,
) -> str:
    """A JWT built by hand, independent of pyjwt, so tests can craft what pyjwt's encoder
    refuses to (alg none, a PEM as HMAC key). ``key=None`` leaves the signature empty."""
    header = {"alg": alg, "typ": "JWT"}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64(sig)


def payload(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "exp": NOW + 60,
        "scope": [SCOPE_READ, SCOPE_SEND],
        "channels": ["room-*"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refused(verifier: TokenVerifier, token: str, now: int = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now)
    err = info.value
    assert err.code in ("unauthorized", "token_expired")
    if token:
        assert token not in str(err) and token not in err.message
    return err


def claims(user: str = "alice", channels: tuple[str, ...] = (), scopes: Any = None) -> Claims:
    scope_set = frozenset(scopes if scopes is not None else (SCOPE_READ, SCOPE_SEND))
    return Claims(user=user, exp=NOW + 60, scopes=scope_set, channels=channels)


# --- issue and verify ---------------------------------------------------------------------


def test_round_trip() -> None:
    token = TokenIssuer(SECRET).issue("alice", ["room-*", "lobby"], now=NOW)
    got = TokenVerifier(SECRET).verify(token, NOW)
    assert got == Claims(
        user="alice",
        exp=NOW + 3600,
        scopes=frozenset({SCOPE_READ, SCOPE_SEND}),
        channels=("room-*", "lobby"),
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_issue_defaults_to_no_channels_but_dms_work() -> None:
    token = TokenIssuer(SECRET).issue("alice", now=NOW)
    got = TokenVerifier(SECRET).verify(token, NOW)
    assert got.channels == ()
    assert not got.may_access("room-1")
    assert got.may_send("dm:alice:bob")


@pytest.mark.parametrize(("now", "expired"), [(NOW + 59, False), (NOW + 60, True)])
def test_expiry_at_exactly_exp(now: int, expired: bool) -> None:
    token = forge(payload())
    verifier = TokenVerifier(SECRET)
    if expired:
        assert refused(verifier, token, now).code == "token_expired"
    else:
        assert verifier.verify(token, now).exp == NOW + 60


def test_leeway() -> None:
    token = forge(payload())
    verifier = TokenVerifier(SECRET, leeway_s=10)
    assert verifier.verify(token, NOW + 69).user == "alice"
    assert refused(verifier, token, NOW + 70).code == "token_expired"


@pytest.mark.parametrize("exp", [NOW + 31 * 86_400, 2**64, 2**64 + 5, 10**30, 2**1000])
def test_an_exp_beyond_the_maximum_lifetime_is_refused(exp: int) -> None:
    """A token that (nearly) never expires is refused, however large its exp: it would
    outlive any revocation, and 2**64 and up do not fit the wire's integers."""
    err = refused(TokenVerifier(SECRET), forge(payload(exp=exp)))
    assert err.code == "unauthorized"
    assert "too far ahead" in err.message and "2592000 s" in err.message
    assert str(exp) not in err.message


def test_max_lifetime_is_a_bound_inclusive_with_leeway() -> None:
    most = DEFAULT_MAX_LIFETIME_S
    assert TokenVerifier(SECRET).verify(forge(payload(exp=NOW + most)), NOW).exp == NOW + most
    refused(TokenVerifier(SECRET), forge(payload(exp=NOW + most + 1)))
    # An issuer's clock a little ahead: the leeway covers it, as it does for exp and nbf.
    assert TokenVerifier(SECRET, leeway_s=5).verify(forge(payload(exp=NOW + most + 5)), NOW)
    short = TokenVerifier(SECRET, max_lifetime_s=60)
    assert short.verify(forge(payload(exp=NOW + 60)), NOW).exp == NOW + 60
    assert "more than 60 s" in refused(short, forge(payload(exp=NOW + 61))).message
    with pytest.raises(ValueError, match="max_lifetime_s"):
        TokenVerifier(SECRET, max_lifetime_s=0)


def test_issue_refuses_a_ttl_over_the_maximum_lifetime() -> None:
    issuer = TokenIssuer(SECRET)
    token = issuer.issue("alice", ttl_s=DEFAULT_MAX_LIFETIME_S, now=NOW)
    assert TokenVerifier(SECRET).verify(token, NOW).exp == NOW + DEFAULT_MAX_LIFETIME_S
    with pytest.raises(ValueError, match="token_max_lifetime_s"):
        issuer.issue("alice", ttl_s=DEFAULT_MAX_LIFETIME_S + 1, now=NOW)
    with pytest.raises(ValueError, match=r"token_max_lifetime_s \(60 s\)"):
        issuer.issue("alice", ttl_s=61, now=NOW, max_ttl_s=60)


def test_not_before() -> None:
    token = forge(payload(nbf=NOW + 5))
    assert refused(TokenVerifier(SECRET), token).code == "unauthorized"
    assert TokenVerifier(SECRET, leeway_s=5).verify(token, NOW).user == "alice"
    assert TokenVerifier(SECRET).verify(token, NOW + 5).user == "alice"


def test_a_verified_token_is_remembered_and_its_times_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second verify of a token does not decode it (a reconnect), yet the token still
    expires, is still not valid before its nbf, and the same claims come back."""
    verifier = TokenVerifier(SECRET)
    token = forge(payload(nbf=NOW - 5))
    first = verifier.verify(token, NOW)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("decoded again"))
    assert verifier.verify(token, NOW + 30) is first
    assert refused(verifier, token, NOW + 60).code == "token_expired"
    assert "nbf" in refused(verifier, token, NOW - 10).message


def test_the_verified_token_cache_is_bounded_and_keeps_refusals_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE_MAX", 3)
    verifier = TokenVerifier(SECRET)
    tokens = [forge(payload(sub=f"u{i}")) for i in range(5)]
    for token in tokens:
        verifier.verify(token, NOW)
    assert list(verifier._verified) == tokens[2:]  # the oldest went first
    bad = forge(payload(sub="mallory"), key=OTHER_SECRET)
    for _ in range(2):  # refused each time: a refusal is never remembered
        assert refused(verifier, bad).code == "unauthorized"
    assert bad not in verifier._verified
    tampered = tokens[4][:-2] + ("AA" if not tokens[4].endswith("AA") else "BB")
    assert refused(verifier, tampered).code == "unauthorized"  # another text: verified
    long = forge(payload(sub="carol", pad="x" * auth.VERIFIED_CACHE_TOKEN_CHARS))
    assert verifier.verify(long, NOW).user == "carol"
    assert long not in verifier._verified  # a long token is verified every time


def test_wrong_secret() -> None:
    err = refused(TokenVerifier(SECRET), forge(payload(), key=OTHER_SECRET))
    assert err.code == "unauthorized"
    assert "signature" in err.message


def test_secret_rotation() -> None:
    old = forge(payload(), key=OLD_SECRET)
    new = forge(payload(), key=SECRET)
    rotating = TokenVerifier(SECRET, extra_secrets=[OLD_SECRET])
    assert rotating.verify(old, NOW).user == "alice"
    assert rotating.verify(new, NOW).user == "alice"
    assert "signature" in refused(rotating, forge(payload(), key=OTHER_SECRET)).message
    assert refused(TokenVerifier(SECRET), old).code == "unauthorized"


@pytest.mark.parametrize(
    "kid", ["unknown-key", "../../../../dev/null", "' OR 1=1 --", "", "x" * 512]
)
def test_kid_header_selects_nothing(kid: str) -> None:
    """tsmsg has no key ids: a ``kid`` header (unknown, a path, an injection) never
    selects a key. The token verifies against the configured secrets or not at all:
    signed with an empty key (what a ``kid`` pointing at /dev/null would give a naive
    verifier) or another secret it is refused; signed with the secret it is accepted."""

    def with_kid(key: bytes) -> str:
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        body = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload()).encode())
        return body + "." + b64(hmac.new(key, body.encode(), hashlib.sha256).digest())

    verifier = TokenVerifier(SECRET, extra_secrets=[OLD_SECRET])
    for key in (b"", OTHER_SECRET):
        assert "signature" in refused(verifier, with_kid(key)).message
    assert verifier.verify(with_kid(SECRET), NOW).user == "alice"
    assert verifier.verify(with_kid(OLD_SECRET), NOW).user == "alice"


def test_other_claims_and_header_fields_are_ignored_but_jti_must_be_a_string() -> None:
    """PROTOCOL.md 5.1: iat and custom claims, typ and kid headers change nothing; the
    HS256 key is the secret's bytes as is."""
    verifier = TokenVerifier(SECRET)
    extra = payload(iat="not even a number", custom={"x": [1, 2]}, jti="a-string")
    assert verifier.verify(forge(extra), NOW).user == "alice"
    assert "jti" in refused(verifier, forge(payload(jti=7))).message
    as_base64 = base64.b64encode(SECRET)  # a verifier must not decode the secret
    assert "signature" in refused(verifier, forge(payload(), key=as_base64)).message


# --- algorithm pinning --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(alg: str) -> None:
    err = refused(TokenVerifier(SECRET), forge(payload(), key=None, alg=alg))
    assert err.code == "unauthorized"


@pytest.mark.parametrize(("alg", "digest"), [("HS384", hashlib.sha384), ("HS512", hashlib.sha512)])
def test_other_hmac_algorithms_rejected_when_hs256_pinned(alg: str, digest: Any) -> None:
    token = forge(payload(), key=SECRET, alg=alg, digest=digest)
    err = refused(TokenVerifier(SECRET), token)
    assert err.code == "unauthorized"
    assert "HS256" in err.message


def test_hs512_verifier_accepts_hs512_only() -> None:
    secret = SECRET * 2  # HS512 wants a 64-byte key
    verifier = TokenVerifier(secret, algorithm="HS512")
    token = TokenIssuer(secret, algorithm="HS512").issue("alice", now=NOW)
    assert verifier.verify(token, NOW).user == "alice"
    refused(verifier, forge(payload(), key=secret))


def _pems(algorithm: str) -> tuple[bytes, bytes]:
    """A fresh (private, public) PEM pair for RS256 or EdDSA; skips without cryptography."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def test_rs256_round_trip_and_key_confusion() -> None:
    private, public = _pems("RS256")
    verifier = TokenVerifier(public_key=public, algorithm="RS256")
    token = TokenIssuer(private, algorithm="RS256").issue("alice", ["room-*"], now=NOW)
    assert verifier.verify(token, NOW).channels == ("room-*",)
    # The classic confusion attack: HS256 with the (public) PEM as the HMAC secret.
    forged = forge(payload(), key=public, alg="HS256")
    assert refused(verifier, forged).code == "unauthorized"
    # An HS256 server never treats a PEM as its secret either.
    with pytest.raises(ValueError):
        TokenVerifier(public + b" " * 32)


def test_rs256_verifier_wants_a_public_key() -> None:
    private, public = _pems("RS256")
    with pytest.raises(ValueError, match="public key"):
        TokenVerifier(public_key=private, algorithm="RS256")
    with pytest.raises(ValueError, match="private key"):
        TokenIssuer(public, algorithm="RS256")
    with pytest.raises(ValueError, match="public_key"):
        TokenVerifier(SECRET, algorithm="RS256")
    with pytest.raises(ValueError):
        TokenVerifier(public_key=b"not a pem", algorithm="RS256")


def test_eddsa_round_trip() -> None:
    private, public = _pems("EdDSA")
    token = TokenIssuer(private, algorithm="EdDSA").issue("alice", now=NOW)
    assert TokenVerifier(public_key=public, algorithm="EdDSA").verify(token, NOW).user == "alice"
    refused(TokenVerifier(public_key=public, algorithm="EdDSA"), forge(payload(), key=public))


@pytest.mark.skipif(jwt.algorithms.has_crypto, reason="cryptography is installed")
def test_asymmetric_without_cryptography_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cryptography"):
        TokenVerifier(public_key=b"-----BEGIN PUBLIC KEY-----", algorithm="RS256")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"secret": b"short"}, "at least 32 bytes"),
        ({"secret": SECRET, "extra_secrets": [b"short"]}, "at least 32 bytes"),
        ({"secret": SECRET, "algorithm": "HS512"}, "at least 64 bytes"),
        ({"secret": SECRET, "algorithm": "none"}, "unsupported algorithm"),
        ({"secret": SECRET, "algorithm": "HS257"}, "unsupported algorithm"),
        ({"secret": None}, "secret"),
        ({"secret": SECRET, "public_key": SECRET}, "secret"),
        ({"secret": SECRET, "leeway_s": -1}, "leeway"),
    ],
)
def test_verifier_misuse(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenVerifier(**kwargs)


# --- claims -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"sub": None}, "'sub'"),
        ({"exp": None}, "'exp'"),
        ({"exp": "1700000060"}, "'exp'"),
        ({"exp": True}, "'exp'"),
        ({"exp": NOW + 60.5}, "'exp'"),
        ({"nbf": "soon"}, "'nbf'"),
        ({"sub": 42}, "'sub'"),
        ({"sub": "al ice"}, "'sub'"),
        ({"sub": "a:b"}, "'sub'"),
        ({"sub": ""}, "'sub'"),
        ({"sub": "a" * (MAX_USER_CHARS + 1)}, "'sub'"),
        ({"channels": "room-*"}, "'channels'"),
        ({"channels": [1]}, "'channels'"),
        ({"channels": {"room-*": True}}, "'channels'"),
        ({"channels": ["room/1"]}, "'channels'"),
        ({"channels": [""]}, "'channels'"),
        ({"channels": [f"r{i}" for i in range(MAX_PATTERNS + 1)]}, "'channels'"),
        ({"scope": [SCOPE_READ, 7]}, "'scope'"),
        ({"scope": "chat:read chat:send"}, "'scope'"),
    ],
)
def test_bad_claims_are_unauthorized(overrides: dict[str, Any], needle: str) -> None:
    if None in overrides.values():  # a missing claim
        body = payload()
        for key in overrides:
            del body[key]
    else:
        body = payload(**overrides)
    err = refused(TokenVerifier(SECRET), forge(body))
    assert err.code == "unauthorized"
    assert needle in err.message


def test_absent_optional_claims_mean_nothing_granted() -> None:
    got = TokenVerifier(SECRET).verify(forge({"sub": "alice", "exp": NOW + 60}), NOW)
    assert got.scopes == frozenset() and got.channels == ()
    assert not got.may_read("dm:alice:bob")


def test_unknown_scopes_are_ignored() -> None:
    token = forge(payload(scope=[SCOPE_READ, "chat:teleport"]))
    assert TokenVerifier(SECRET).verify(token, NOW).scopes == frozenset({SCOPE_READ})


def test_max_patterns_accepted() -> None:
    token = forge(payload(channels=[f"r{i}" for i in range(MAX_PATTERNS)]))
    assert len(TokenVerifier(SECRET).verify(token, NOW).channels) == MAX_PATTERNS


def test_audience() -> None:
    verifier = TokenVerifier(SECRET, audience="tsmsg")
    assert verifier.verify(forge(payload(aud="tsmsg")), NOW).user == "alice"
    assert verifier.verify(forge(payload(aud=["other", "tsmsg"])), NOW).user == "alice"
    assert "audience" in refused(verifier, forge(payload(aud="other"))).message
    assert "'aud'" in refused(verifier, forge(payload())).message
    # A token meant for some audience is not accepted by a server that names none.
    assert "audience" in refused(TokenVerifier(SECRET), forge(payload(aud="other"))).message


def test_issuer() -> None:
    verifier = TokenVerifier(SECRET, issuer="https://idp.example")
    token = TokenIssuer(SECRET).issue("alice", now=NOW, issuer="https://idp.example")
    assert verifier.verify(token, NOW).user == "alice"
    assert "issuer" in refused(verifier, forge(payload(iss="https://evil.example"))).message
    # pyjwt 2.10.0 matched a string issuer by substring (CVE-2024-53861).
    assert "issuer" in refused(verifier, forge(payload(iss="https://idp"))).message
    assert "'iss'" in refused(verifier, forge(payload())).message


def test_claims_are_checked_alike_whatever_checks_the_signature() -> None:
    """HMAC tokens are checked by the extension, EdDSA/RS256 ones by pyjwt; the claims by
    the verifier, the same for both: one table of payloads, one answer each."""
    private, public = _pems("EdDSA")

    def claims(**overrides: Any) -> dict[str, Any]:  # None removes a claim
        return payload(**{"aud": "tsmsg", "iss": "idp", **overrides})

    cases: list[tuple[dict[str, Any], str | None]] = [
        (claims(), None),
        (claims(aud=["x", "tsmsg"], iat="ignored", jti="j", custom={"a": [1]}), None),
        (claims(sub=None), "lacks the required claim 'sub'"),
        (claims(exp=None), "lacks the required claim 'exp'"),
        (claims(sub=7), "claim 'sub' must be a string"),
        (claims(jti=7), "claim 'jti' must be a string"),
        (claims(exp="soon"), "claim 'exp' must be an integer"),
        (claims(aud=None), "lacks the required claim 'aud'"),
        (claims(aud="other"), "audience does not match"),
        (claims(aud=[7]), "audience does not match"),
        (claims(aud={"tsmsg": 1}), "audience does not match"),
        (claims(iss=None), "lacks the required claim 'iss'"),
        (claims(iss="idp2"), "issuer is not accepted"),
        (claims(iss=["idp"]), "issuer is not accepted"),
    ]
    hs = TokenVerifier(SECRET, audience="tsmsg", issuer="idp")
    ed = TokenVerifier(public_key=public, algorithm="EdDSA", audience="tsmsg", issuer="idp")
    for body, error in cases:
        for verifier, token in [(hs, forge(body)), (ed, jwt.encode(body, private, "EdDSA"))]:
            if error is None:
                assert verifier.verify(token, NOW).user == "alice"
            else:
                assert error in refused(verifier, token).message, (body, verifier.algorithm)
    # A verifier that names no audience refuses a token that names one, even empty.
    for aud in ("tsmsg", [], ""):
        assert "audience" in refused(TokenVerifier(SECRET), forge(payload(aud=aud))).message
    # The wording of a wrong algorithm or signature is the verifier's, for both.
    other_private, _ = _pems("EdDSA")
    forged_ed = jwt.encode(claims(), other_private, algorithm="EdDSA")
    assert "signature" in refused(ed, forged_ed).message
    assert "EdDSA" in refused(ed, forge(claims())).message
    assert "HS256" in refused(hs, forged_ed).message


def _signed_both(body: bytes, header: bytes = b"", **kw: Any) -> list[tuple[TokenVerifier, str]]:
    """One payload (JSON text as is) and extra header members, signed HS256 and EdDSA by
    hand: the HMAC path (the extension) and the public-key path (pyjwt's algorithm)."""
    private, public = _pems("EdDSA")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ed_key: Any = load_pem_private_key(private, None)
    out = []
    for alg, verifier in [
        ("HS256", TokenVerifier(SECRET, **kw)),
        ("EdDSA", TokenVerifier(public_key=public, algorithm="EdDSA", **kw)),
    ]:
        head = b'{"alg":"%s"%s}' % (alg.encode(), b"," + header if header else b"")
        signing_input = b64(head) + "." + b64(body)
        if alg == "HS256":
            sig = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
        else:
            sig = ed_key.sign(signing_input.encode())
        out.append((verifier, signing_input + "." + b64(sig)))
    return out


EXP = NOW + 60
AUD = {"audience": "tsmsg"}
DEEP = b"[" * 1200 + b"]" * 1200  # deeper than Python's JSON parser goes; fits a token


@pytest.mark.parametrize(
    ("body", "header", "kw", "answer"),
    [
        # a claim's wrong JSON type: the claim's own message (a JWT crate's typed claims
        # once answered "malformed" on the HMAC path only)
        (b'{"sub": ["alice"], "exp": %d}' % EXP, b"", {}, "claim 'sub' must be a string"),
        (b'{"sub": "alice", "exp": {"a": 1}}', b"", {}, "claim 'exp' must be an integer"),
        (b'{"sub": "alice", "exp": %d, "nbf": [1]}' % EXP, b"", {}, "claim 'nbf' must be"),
        # JSON that Python reads: an escaped lone surrogate in a claim no check compares
        (b'{"sub": "alice", "exp": %d, "iss": "a\\ud800b"}' % EXP, b"", {}, None),
        (b'{"sub": "alice", "exp": %d, "aud": ["tsmsg", "\\udc00"]}' % EXP, b"", AUD, None),
        # header members other than alg are ignored, whatever their type
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"typ":1,"kid":1,"cty":[],"jwk":{}', {}, None),
        # ... but not an extension (RFC 7515 4.1.11, RFC 7797)
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"b64":false,"crit":["b64"]', {}, "malformed"),
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"crit":["exp"]', {}, "malformed"),
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"b64":false', {}, "malformed"),
        # aud: a string or an array of strings
        (b'{"sub": "alice", "exp": %d, "aud": ["tsmsg", 7]}' % EXP, b"", AUD, "audience"),
        (b'{"sub": "alice", "exp": %d, "aud": null}' % EXP, b"", {}, "audience"),
        # strict JSON: a member named twice (which of two "sub"s would count? RFC 7519 4),
        # nested too, and no NaN
        (b'{"sub": "alice", "exp": %d, "sub": "mallory"}' % EXP, b"", {}, "malformed"),
        (b'{"sub": "alice", "exp": %d, "channels": ["a"], "channels": ["*"]}' % EXP, b"", {},
         "malformed"),
        (b'{"sub": "alice", "exp": %d, "x": {"y": 1, "y": 2}}' % EXP, b"", {}, "malformed"),
        (b'{"sub": "alice", "exp": %d, "x": NaN}' % EXP, b"", {}, "malformed"),
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"alg":"HS256"', {}, "malformed"),
        # nesting deeper than the JSON parser goes: malformed, not an internal error
        (b'{"sub": "alice", "exp": %d, "x": %s}' % (EXP, DEEP), b"", {},
         "malformed"),
        (b'{"sub": "alice", "exp": %d}' % EXP, b'"x":' + DEEP, {},
         "malformed"),
    ],
    ids=lambda v: v.decode(errors="replace")[:40] if isinstance(v, bytes) else None,
)  # fmt: skip
def test_one_token_one_answer_on_both_paths(
    body: bytes, header: bytes, kw: dict[str, Any], answer: str | None
) -> None:
    """Whatever checks the signature, the parts, the header and the claims are read the
    same way (a review of the first version found five ways they differed)."""
    for verifier, token in _signed_both(body, header, **kw):
        if answer is None:
            assert verifier.verify(token, NOW).user == "alice", verifier.algorithm
        else:
            assert answer in refused(verifier, token).message, verifier.algorithm


@pytest.mark.parametrize("alg", ["none", "ES512", "hs256", "HS1", ""])
def test_an_algorithm_this_server_does_not_pin_is_named_so(alg: str) -> None:
    token = b64(b'{"alg":"%s"}' % alg.encode()) + "." + b64(json.dumps(payload()).encode()) + "."
    eddsa = TokenVerifier(public_key=_pems("EdDSA")[1], algorithm="EdDSA")
    for verifier in (TokenVerifier(SECRET), eddsa):
        assert "algorithm is not allowed" in refused(verifier, token).message


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_a_signature_of_any_length_is_only_invalid(algorithm: str) -> None:
    """pyjwt's algorithms answer a signature of the wrong length with False, not an
    exception: the verifier relies on it (no internal error from a garbled token)."""
    verifier = TokenVerifier(public_key=_pems(algorithm)[1], algorithm=algorithm)
    head = b64(json.dumps({"alg": algorithm}).encode()) + "." + b64(json.dumps(payload()).encode())
    for signature in (b"", b"x", b"\xff" * 300, b"\0" * 64):
        assert (
            refused(verifier, head + "." + b64(signature)).message == "token signature is invalid"
        )


def test_an_unsigned_deep_header_is_refused_before_any_signature_check() -> None:
    header = b'{"alg":"EdDSA","x":' + DEEP + b"}"
    token = b64(header) + "." + b64(json.dumps(payload()).encode()) + "." + b64(b"\0" * 64)
    verifier = TokenVerifier(public_key=_pems("EdDSA")[1], algorithm="EdDSA")
    assert refused(verifier, token).message == "malformed token"


# --- malformed tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "..", "a.b.c.d", "eyJhbGciOiJIUzI1NiJ9..", "é.é.é", "a\x00.b.c"],
)
def test_malformed_tokens(token: str) -> None:
    assert refused(TokenVerifier(SECRET), token).code == "unauthorized"


def test_oversize_token_is_refused_before_decoding() -> None:
    good = forge(payload())
    padded = good + "A" * (MAX_TOKEN_CHARS + 1 - len(good))
    err = refused(TokenVerifier(SECRET), padded)
    assert "longer than 8192" in err.message


def test_non_string_token() -> None:
    with pytest.raises(AuthError, match="unauthorized: token must be a string"):
        TokenVerifier(SECRET).verify(b"abc", NOW)  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_cleanly(token: str) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(SECRET).verify(token, NOW)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["sub", "exp", "nbf", "scope", "channels", "aud"]), _json))
def test_signed_arbitrary_claims_give_claims_or_auth_error(body: dict[str, Any]) -> None:
    try:
        got = TokenVerifier(SECRET).verify(forge(body), NOW)
    except AuthError:
        return
    assert valid_user(got.user) and got.exp > NOW


# --- names and DM channels ----------------------------------------------------------------


def test_valid_user_and_channel() -> None:
    assert valid_user("alice.b@example-1_x")
    assert valid_user("a" * MAX_USER_CHARS)
    for bad in ["", "a:b", "al ice", "alice\n", "ålice", "a" * (MAX_USER_CHARS + 1), 3, None]:
        assert not valid_user(bad)
    assert valid_channel("room-1") and valid_channel("dm:alice:bob")
    assert valid_channel("c" * auth.MAX_CHANNEL_CHARS)
    for bad in ["", "room 1", "room/1", "room-1\n", "c" * (auth.MAX_CHANNEL_CHARS + 1), 1]:
        assert not valid_channel(bad)


def test_limits_fit_together() -> None:
    longest = "u" * MAX_USER_CHARS
    assert valid_channel(dm_channel(longest, longest[:-1] + "v"))
    from tsmsg.store.base import MAX_CHANNEL_BYTES, MAX_USER_BYTES

    assert auth.MAX_CHANNEL_CHARS <= MAX_CHANNEL_BYTES
    assert MAX_USER_CHARS <= MAX_USER_BYTES


def test_dm_channel_and_parse_dm() -> None:
    assert dm_channel("bob", "alice") == "dm:alice:bob" == dm_channel("alice", "bob")
    assert parse_dm("dm:alice:bob") == ("alice", "bob")
    for bad in [
        "dm:alice:alice",
        "dm:bob:alice",
        "dm:alice",
        "dm:alice:bob:carol",
        "dm::bob",
        "dm:alice:b c",
        "dm:alice:" + "b" * (MAX_USER_CHARS + 1),
        "DM:alice:bob",
        "room-1",
    ]:
        assert parse_dm(bad) is None, bad
    with pytest.raises(ValueError, match="distinct"):
        dm_channel("alice", "alice")
    with pytest.raises(ValueError, match="invalid user id"):
        dm_channel("alice", "b:c")


def test_glob_patterns_are_case_sensitive_and_anchored() -> None:
    c = claims(channels=("room-*", "team-?", "ops-[ab]"))
    assert c.may_access("room-1") and c.may_access("room-")
    assert not c.may_access("Room-1")
    assert not c.may_access("xroom-1")
    assert c.may_access("team-x") and not c.may_access("team-xy")
    assert c.may_access("ops-a") and not c.may_access("ops-c")
    assert not c.may_access("lobby")


def test_invalid_channel_names_are_never_accessible() -> None:
    c = claims(channels=("*",))
    assert c.may_access("lobby")
    for bad in ["", "room 1", "room/1", "c" * (auth.MAX_CHANNEL_CHARS + 1)]:
        assert not c.may_access(bad)


def test_dm_channels_are_implied_for_their_two_users_only() -> None:
    alice = claims("alice", channels=("*", "dm:*", "dm:bob:carol"))
    assert alice.may_access("dm:alice:bob")
    assert alice.may_access("dm:alice:carol")
    # A pattern never opens someone else's DM, even "*".
    assert not alice.may_access("dm:bob:carol")
    # Malformed names in the dm: namespace are open to nobody.
    assert not alice.may_access("dm:alice:alice")
    assert not alice.may_access("dm:bob:alice")
    assert not alice.may_access("dm:alice:bob:carol")
    assert not alice.may_access("dm:alice")
    # DMs need no pattern at all.
    assert claims("bob").may_access("dm:alice:bob")
    assert not claims("carol").may_access("dm:alice:bob")


def test_scopes_gate_actions() -> None:
    reader = claims(channels=("room-*",), scopes={SCOPE_READ})
    assert reader.may_read("room-1")
    assert not reader.may_send("room-1")
    assert not reader.may_moderate("room-1")
    mod = claims(channels=("room-*",), scopes={SCOPE_MODERATE})
    assert mod.may_moderate("room-1")
    assert not mod.may_moderate("lobby")  # moderation still needs access
    assert not mod.may_read("room-1")  # and implies no other scope
    assert not claims(channels=("room-*",)).may_moderate("room-1")


# --- issuing and secrets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("a:b",), {}, "invalid user id"),
        (("alice", ["room/1"]), {}, "invalid channel pattern"),
        (("alice", ["r"] * (MAX_PATTERNS + 1)), {}, "patterns"),
        (("alice",), {"scopes": ["chat:write"]}, "unknown scopes"),
        (("alice",), {"ttl_s": 0}, "ttl_s"),
        (("alice", ["r" * 256] * MAX_PATTERNS), {}, "max 8192"),
    ],
)
def test_issue_misuse(args: tuple[Any, ...], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenIssuer(SECRET).issue(*args, now=NOW, **kwargs)


def test_secret_from_env() -> None:
    assert secret_from_env({}) is None
    assert secret_from_env({"TSMSG_SECRET": SECRET.decode()}) == SECRET
    with pytest.raises(ValueError, match="at least 32 bytes") as info:
        secret_from_env({"TSMSG_SECRET": "hunter2"})
    assert "hunter2" not in str(info.value)


def test_generate_dev_secret() -> None:
    a, b = generate_dev_secret(), generate_dev_secret()
    assert a != b and len(a) >= 32
    assert secret_from_env({"TSMSG_SECRET": a.decode()}) == a
    token = TokenIssuer(a).issue("alice", now=NOW)
    assert TokenVerifier(a).verify(token, NOW).user == "alice"


def test_signing_secret_takes_the_environment_then_the_file(tmp_path: Path) -> None:
    """What the examples sign with: TSMSG_SECRET, else the secret file (serve --dev's)."""
    path = tmp_path / "dev-secret"
    assert signing_secret(str(path), {}) is None  # neither
    path.write_bytes(b"f" * 32 + b"\n" + b"o" * 32 + b"\n")
    assert signing_secret(str(path), {}) == b"f" * 32  # the file's current (first) one
    assert signing_secret(str(path), {"TSMSG_SECRET": "e" * 32}) == b"e" * 32
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError):
        signing_secret(str(path), {})  # a bad file is an error, never skipped
