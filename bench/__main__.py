"""Entry point: `python -m bench <benchmark> [options]`."""

import sys

from bench import mqtt_bench

BENCHMARKS = {"mqtt": mqtt_bench.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m bench {{{names}}} [options]  (--help after the name for its options)",
              file=sys.stderr)
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
