"""Entry point: `python -m bench <benchmark> [options]`."""

import importlib
import sys

# Imported only when chosen: load processes are spawned, and each one imports
# this module again, so it must stay light.
BENCHMARKS = {"mqtt": "bench.mqtt_bench", "auth": "bench.auth_bench", "latency": "bench.latency_bench",
              "amqp": "bench.amqp_bench", "memory": "bench.memory_bench", "storm": "bench.storm_bench",
              "authpath": "bench.authpath_bench", "persist": "bench.persist_bench", "hotpath": "bench.hotpath_bench",
              "tls": "bench.tls_bench",
              "all": "bench.all_bench"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m bench {{{names}}} [options]  (--help after the name for its options)",
              file=sys.stderr)
        return 2
    benchmark = importlib.import_module(BENCHMARKS[argv[0]])
    exit_code: int = benchmark.main(argv[1:])
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
