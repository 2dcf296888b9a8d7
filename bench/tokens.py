"""What checking a hello's token costs: the measurement behind rust/src/jwt.rs (issue 17).

Every connect checks its token, and a device's first connect to a node (a reconnect
storm after a node is lost, a morning peak) finds it in no cache. This times the check
of distinct HS256 tokens like the ones `tsmsg token` issues, three ways, in alternating
rounds:

- ``pyjwt``: ``jwt.decode`` with the options the server used until 2026-12-07 (claims
  required, times checked by the caller), the named alternative;
- ``verifier``: ``TokenVerifier.verify`` as the server calls it now (the parts and the
  signature in the extension, header and claims in Python), each token once, so never
  from its cache;
- ``extension``: the extension's part alone (``jws_parts`` and ``HmacJwt.verify``).

Printed: µs of CPU per token, the median of the rounds. One core, in a loop: warm caches,
so the server's cost per connect is higher (bench/README.md, "The token check").

    taskset -c 0 .venv/bin/python bench/tokens.py [--tokens 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import jwt

from tsmsg._native import HmacJwt, jws_parts
from tsmsg.auth import TokenIssuer, TokenVerifier

SECRET = b"bench-token-secret-0123456789abcdef"
NOW = 1_800_000_000
PYJWT_OPTIONS = {
    "require": ["sub", "exp"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
}


def per_token(check: Callable[[str], object], tokens: list[str]) -> float:
    start = time.process_time()
    for token in tokens:
        check(token)
    return (time.process_time() - start) / len(tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    issuer = TokenIssuer(SECRET)
    hmac_jwt = HmacJwt("HS256", [SECRET])

    def pyjwt(token: str) -> object:
        return jwt.decode(token, SECRET, algorithms=["HS256"], options=PYJWT_OPTIONS)

    def extension(token: str) -> object:
        signature = jws_parts(token)[2]
        return hmac_jwt.verify(token[: token.rindex(".")].encode(), signature)

    figures: dict[str, list[float]] = {"pyjwt": [], "verifier": [], "extension": []}
    for r in range(args.rounds):
        tokens = [issuer.issue(f"user-{r}-{i}", ["room-*"], now=NOW) for i in range(args.tokens)]
        verifier = TokenVerifier(SECRET)  # a fresh one: every token is new to its cache
        checks = {
            "pyjwt": pyjwt,
            "verifier": functools.partial(verifier.verify, now=NOW),
            "extension": extension,
        }
        for way, check in checks.items():
            figures[way].append(per_token(check, tokens))
    size = len(tokens[0])
    print(f"{args.tokens} distinct HS256 tokens ({size} characters), {args.rounds} rounds")
    for way, values in figures.items():
        low, high = min(values), max(values)
        print(f"{way:>10}: {statistics.median(values):5.1f} µs per token ({low:.1f}-{high:.1f})")


if __name__ == "__main__":
    main()
