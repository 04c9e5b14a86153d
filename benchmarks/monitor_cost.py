"""The cost of ``train.monitor`` at the quick recipe's settings.

    python benchmarks/monitor_cost.py [--epochs 2] [--every 50]

Trains ``recipes/dino_fmnist_quick.yaml`` on fmnist-scenes (built in a temporary folder, with its
``labels.csv`` and masks) for ``--epochs`` with the monitor on (k-NN and knn-seg, the first 200
images of train and val) every ``--every`` steps, reads the seconds of every training step
(``time/step``, compute only) and of every measurement (``time/monitor``) from metrics.jsonl, and
extrapolates to the full quick recipe (744 steps) with the monitor every 100 steps:
``share = measurements × monitor seconds / (steps × step seconds + measurements × monitor seconds)``.
Writes ``benchmarks/results/monitor_cost.json``. One run; the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()

    from mlsctl import config
    from mlsctl.data.fmnist import build_scenes
    from mlsctl.train import pretrain

    work = Path(tempfile.mkdtemp(prefix="monitor-cost-"))
    scenes = work / "fmnist-scenes"
    build_scenes(scenes, progress=False)
    monitor = [f"train.monitor.every={args.every}", f"train.monitor.train={scenes / 'train/images'}",
               f"train.monitor.train_labels={scenes / 'train/labels.csv'}", f"train.monitor.val={scenes / 'val/images'}",
               f"train.monitor.val_labels={scenes / 'val/labels.csv'}", f"train.monitor.train_masks={scenes / 'train/masks'}",
               f"train.monitor.val_masks={scenes / 'val/masks'}"]
    recipe = config.load_recipe(str(REPO / "recipes" / "dino_fmnist_quick.yaml"),
                                [f"data.root={scenes / 'train/images'}", f"optim.epochs={args.epochs}", "train.log_every=1",
                                 "train.checkpoint_every=100000", *monitor])
    pretrain(recipe, work / "run")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step"] for r in rows if "time/step" in r][5:]
    measurements = [r["time/monitor"] for r in rows if "time/monitor" in r]
    step_s, monitor_s = statistics.median(steps), statistics.median(measurements)
    full_steps, full_every = 744, 100
    n = full_steps // full_every
    share = n * monitor_s / (full_steps * step_s + n * monitor_s)
    last = [r for r in rows if "monitor/knn_top1" in r][-1]
    result = {"recipe": "recipes/dino_fmnist_quick.yaml", "epochs_run": args.epochs, "every": args.every,
              "monitor_images": 200, "step_seconds_median": step_s, "monitor_seconds_median": monitor_s,
              "measurements": len(measurements), "extrapolated": {"steps": full_steps, "every": full_every,
                                                                  "measurements": n, "share": share},
              "last_monitor": {k: v for k, v in last.items() if k.startswith("monitor/")}}
    out = REPO / "benchmarks" / "results" / "monitor_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"step {step_s:.3f} s, one measurement {monitor_s:.2f} s (k-NN + knn-seg on 200 + 200 images); the quick "
          f"recipe (744 steps) with the monitor every 100 steps spends {100 * share:.1f}% of its time monitoring")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
