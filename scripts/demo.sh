#!/usr/bin/env bash
# The quickstart behind `make demo`: build fmnist-scenes, pretrain the quick DINO recipe on the
# CPU, embed the scenes with the trained and with a randomly initialised model of the same
# architecture, compare their dense k-NN segmentation, and draw PCA patch maps; then build
# fmnist-products, pretrain the quick MILE recipe, index the gallery objects and search with two
# photos of one object. Running it again reuses the data, the finished runs, the features and the
# results.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
RUN=runs/dino_fmnist_quick

echo "== 1/7 fmnist-scenes (2,000 train / 500 val scenes from real Fashion-MNIST items)"
mlsctl data fmnist-scenes --out data/fmnist-scenes

echo "== 2/7 pretrain recipes/dino_fmnist_quick.yaml"
if compgen -G "$RUN/checkpoints/step-*/state.json" > /dev/null; then
  mlsctl pretrain recipes/dino_fmnist_quick.yaml --out "$RUN" --resume
else
  mlsctl pretrain recipes/dino_fmnist_quick.yaml --out "$RUN" --overwrite
fi

python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
k = max(1, len(rows) // 6)  # single-step losses are noisy: compare the first and last sixth
start = sum(r["loss"] for r in rows[:k]) / k
end = sum(r["loss"] for r in rows[-k:]) / k
print(f"\nrun: {run}/  (config.yaml, metrics.jsonl, train.log, checkpoints/, teacher.safetensors)")
print(f"mean loss of steps {rows[0]['step']}-{rows[k - 1]['step']}: {start:.3f}; "
      f"of steps {rows[-k]['step']}-{rows[-1]['step']}: {end:.3f} ({100 * (end - start) / start:+.1f}%); "
      f"{summary['images_per_s']:.1f} images/s")
PY
echo "== 3/7 embed train and val scenes (dense) with the trained teacher and with a random init"
FEATS=features/demo
for split in train val; do
  mlsctl embed "data/fmnist-scenes/$split/images" --run "$RUN" --dense --out "$FEATS/trained-$split"
  mlsctl embed "data/fmnist-scenes/$split/images" --run "$RUN" --random-init --dense --out "$FEATS/random-$split"
done

echo "== 4/7 dense k-NN segmentation (Hummingbird protocol, all 2,000 training scenes as memory)"
for model in trained random; do
  result="results/demo-knn-seg-$model.json"
  if [ -f "$result" ] && [ "$result" -nt "$FEATS/$model-train/manifest.json" ] && [ "$result" -nt "$FEATS/$model-val/manifest.json" ]; then
    echo "$model: reusing $result"
  else
    mlsctl eval knn-seg --train "$FEATS/$model-train" --train-masks data/fmnist-scenes/train/masks \
      --val "$FEATS/$model-val" --val-masks data/fmnist-scenes/val/masks --fraction 1/1 --out "$result" > /dev/null
  fi
done

echo "== 5/7 PCA patch maps of val scenes"
mlsctl viz pca "$FEATS/trained-val" --out "$RUN/pca-val.png" --n 16

python - <<'PY'
import json
trained = json.load(open("results/demo-knn-seg-trained.json"))
random = json.load(open("results/demo-knn-seg-random.json"))
t, r = trained["results"][0], random["results"][0]
print(f"\nknn-seg mIoU on fmnist-scenes val (memory: {t['runs'][0]['memory_patches']} patches of "
      f"{t['train_images']} train scenes, k={trained['settings']['k']}):")
print(f"  trained (dino_fmnist_quick teacher): {100 * t['miou']:.1f}%")
print(f"  random init, same architecture:      {100 * r['miou']:.1f}%")
print("per-class IoU: results/demo-knn-seg-trained.json; PCA patch maps: runs/dino_fmnist_quick/pca-val.png")
PY
echo "== 6/7 fmnist-products and MILE (recipes/mile_fmnist_quick.yaml)"
mlsctl data fmnist-products --out data/fmnist-products
MILE=runs/mile_fmnist_quick
if compgen -G "$MILE/checkpoints/step-*/state.json" > /dev/null; then
  mlsctl pretrain recipes/mile_fmnist_quick.yaml --out "$MILE" --resume
else
  mlsctl pretrain recipes/mile_fmnist_quick.yaml --out "$MILE" --overwrite
fi

echo "== 7/7 gallery of the 200 evaluation objects and one image-set search"
if [ -f galleries/demo-products/gallery.json ] && [ galleries/demo-products/gallery.json -nt "$MILE/summary.json" ] \
   && grep -q '"format_version": 3' galleries/demo-products/gallery.json; then
  echo "reusing galleries/demo-products"
else
  mlsctl index build data/fmnist-products/gallery --run "$MILE" --out galleries/demo-products --overwrite
fi
echo "mlsctl search --set data/fmnist-products/query/ev00007/04.png data/fmnist-products/query/ev00007/05.png --index galleries/demo-products -k 5"
mlsctl search --set data/fmnist-products/query/ev00007/04.png data/fmnist-products/query/ev00007/05.png \
  --index galleries/demo-products -k 5
echo "(the photos show object ev00007; mlsctl eval retrieval --run $MILE measures R@k over all 200 objects)"
echo "demo finished in $(( $(date +%s) - start ))s"
