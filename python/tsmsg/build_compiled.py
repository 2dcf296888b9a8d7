"""``python -m tsmsg.build_compiled``: compile the event loop's hot modules with mypyc
(:mod:`tsmsg.compiled`; ``make`` runs it, docs/deploy.md says when to run it by hand)."""

from tsmsg.compiled import MODULES, OUT_DIR, build

if __name__ == "__main__":
    build()
    print(f"tsmsg: compiled {len(MODULES)} modules into {OUT_DIR}")
