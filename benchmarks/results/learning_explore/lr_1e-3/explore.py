"""Several ``real`` runs of ``stage=learn``, each with its own overrides, all at once on one
thread each (as ``make learn`` runs its runs), from ``benchmarks/learning.py``'s pieces:

    PYTHONPATH=. .venv/bin/python benchmarks/results/learning_explore/lr_1e-3/explore.py WORK \
        '{"name": ["override", ...], ...}' STEPS

Writes WORK/<name>.md (final accuracies, per-modality loss table) and WORK/<name>.json.
An exploration tool (how these results were made), not part of the benchmark."""

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import learning as L  # noqa: E402


def main() -> None:
    work, configs, steps = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    root = work / "data" / "real"
    if not (root / L.prepare.LEARN_METADATASET).exists():
        started = time.perf_counter()
        L.make_data(work, "real", 1000, 0, None)
        print("data", round(time.perf_counter() - started), "s", flush=True)
    L.RUNS.update({name: ("real", 1, "single") for name in configs})
    with ProcessPoolExecutor(len(configs)) as pool:
        jobs = {pool.submit(L.train_and_probe, work, name, root, steps, overrides, 1): name
                for name, overrides in configs.items()}  # fmt: skip
        for done in as_completed(jobs):
            name = jobs[done]
            manifest, results, wall = done.result()
            acc = {t: round(v["accuracy"] * 100, 1) for t, v in results.items()}
            print(name, f"{wall:.0f}s", acc, flush=True)
            text = f"overrides {configs[name]}\nwall {wall:.0f}s\n{acc}\n\n"
            (work / f"{name}.md").write_text(text + L.loss_table({name: manifest}) + "\n")
            record = {"overrides": configs[name], "wall": wall, "results": results}
            (work / f"{name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
