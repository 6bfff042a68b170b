"""Peak memory of one method in a fresh process (see bench/measure.py for the method).

    python -m bench.worker '{"model": "bench", "method": "naive", "group": {"response_tokens": 2048,
                             "group_size": 4, "image": [448, 336]}, "groups": 1}'

Prints one JSON object: the memory delta, the run's seconds, the tokens, the process's
torch threads. Weights (the eager twin's too) and inputs are in the baseline, so the delta
is what the computation itself allocates.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    from bench.context import Bench
    from bench.measure import cuda_peak_delta, peak_rss_delta
    from bench.workload import GroupSpec

    bench = Bench(spec.get("model", "demo"), device=spec.get("device", "cpu"), dtype=spec.get("dtype", "auto"),
                  threads=spec.get("threads"))
    group = spec.get("group", {})
    gspec = GroupSpec(response_tokens=int(group.get("response_tokens", 256)),
                      group_size=int(group.get("group_size", 4)),
                      image=tuple(group.get("image", (448, 336))), seed=int(group.get("seed", 0)))
    method = spec["method"]
    prepared = bench.prepare(bench.groups(gspec, int(spec.get("groups", 1))))
    # warm the kernels up on a tiny group of the same image, so lazy initialisation is not counted
    warm = bench.prepare(bench.groups(replace(gspec, response_tokens=8, group_size=1)))
    bench.call(method, warm)()
    fn = bench.call(method, prepared)
    measure = cuda_peak_delta if str(bench.device).startswith("cuda") else peak_rss_delta
    out = measure(fn)
    prefix = int(prepared[0].prompt.input_ids.numel())
    out.update({
        "method": method,
        "model": bench.model_kind,
        "threads": bench.threads,
        "prefix_tokens": prefix,
        "sequence_tokens": sum(prefix + len(r.tokens.token_ids) for p in prepared for r in p.responses),
        "group": gspec.to_dict(),
        "groups": len(prepared),
    })
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
