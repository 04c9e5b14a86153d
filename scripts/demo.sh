#!/usr/bin/env bash
# The quickstart behind `make demo`, on the backbone this project trained (weights/README.md):
# build fmnist-scenes, embed its scenes with the backbone and with the same architecture at random,
# compare their dense k-NN segmentation and draw PCA patch maps; then build fmnist-products,
# fine-tune MILE from the backbone for a few steps, index the gallery objects and search with two
# photos of one object. About 10 minutes on a 2-core CPU the first time (README.md quotes the last measurement);
# running it again reuses the data, the features, the results and the finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BACKBONE=weights/dino_fmnist_backbone.safetensors
FEATS=features/demo
MILE=runs/mile_fmnist_backbone_demo

# What a run reuses was made from one backbone: after a pull that brings another one, made again.
made_from="$FEATS/backbone.sha256"
backbone_sum=$(sha256sum "$BACKBONE" | cut -d' ' -f1)
if [ -d "$FEATS" ] || [ -d "$MILE" ]; then
  if [ ! -f "$made_from" ] || [ "$(cat "$made_from")" != "$backbone_sum" ]; then
    echo "$BACKBONE is not the backbone the last demo used: its features, results, MILE run and gallery are made again"
    rm -rf "$FEATS" results/demo-knn-seg-*.json results/demo-search-ev00007.json "$MILE" galleries/demo-products
  fi
fi
mkdir -p "$FEATS"
echo "$backbone_sum" > "$made_from"

echo "== 1/6 fmnist-scenes (2,000 train / 500 val scenes from real Fashion-MNIST items)"
mlsctl data fmnist-scenes --out data/fmnist-scenes

echo "== 2/6 dense features of the scenes: the backbone in weights/ and its architecture at random"
for split in train val; do
  for model in backbone random; do
    extra=(); [ $model = random ] && extra=(--random-init --seed 0)
    if [ -f "$FEATS/$model-$split/manifest.json" ]; then echo "reusing $FEATS/$model-$split"; continue; fi
    mlsctl embed "data/fmnist-scenes/$split/images" --weights "$BACKBONE" "${extra[@]}" --dense --out "$FEATS/$model-$split"
  done
done

# The memory: 36 patches of each of the 2,000 training scenes (of 144), drawn as the Hummingbird protocol draws
# them, rare classes first: a quarter of the search of all 288,000 patches (docs/index.md compares the two)
MEMORY=72000
echo "== 3/6 dense k-NN segmentation (Hummingbird protocol; memory: $MEMORY patches of the 2,000 training scenes)"
for model in backbone random; do
  result="results/demo-knn-seg-$model.json"
  if [ -f "$result" ] && [ "$result" -nt "$FEATS/$model-train/manifest.json" ] \
     && [ "$result" -nt "$FEATS/$model-val/manifest.json" ] \
     && python -c "import json, sys; sys.exit(json.load(open('$result'))['settings'].get('memory_size') != $MEMORY)" \
        2> /dev/null; then
    echo "$model: reusing $result"
  else
    mlsctl eval knn-seg --train "$FEATS/$model-train" --train-masks data/fmnist-scenes/train/masks \
      --val "$FEATS/$model-val" --val-masks data/fmnist-scenes/val/masks --fraction 1/1 --memory-size $MEMORY \
      --out "$result" > /dev/null
  fi
done
python - "$BACKBONE" "$MEMORY" <<'PY'
import json, sys
from safetensors import safe_open
from mlsctl.evaluate.segmentation import foreground_background_iou
with safe_open(sys.argv[1], "pt") as handle:
    trained = json.loads(handle.metadata()["provenance"])
print(f"\nknn-seg on fmnist-scenes val (memory: {int(sys.argv[2]):,} patches of the 2,000 train scenes, k=30):")
print(f"  {'model':42} {'mIoU':>6} {'foreground IoU':>15}")
for model, label in (("backbone", f"backbone in weights/ (DINO, {trained['steps']:,} steps)"),
                     ("random", "same architecture, random init")):
    first = json.load(open(f"results/demo-knn-seg-{model}.json"))["results"][0]
    fg = first.get("foreground_iou")
    if fg is None and all("confusion" in run for run in first["runs"]):  # kept from an mlsctl before it was saved
        fg = sum(foreground_background_iou(run["confusion"])["foreground_iou"] for run in first["runs"]) / len(first["runs"])
    shown = f"{100 * fg:14.1f}%" if fg is not None else f"{'n/a':>15}"
    print(f"  {label:42} {100 * first['miou']:5.1f}% {shown}")
chance = json.load(open("results/demo-knn-seg-backbone.json"))["chance"]
print(f"  {'chance: every pixel ' + chance['majority_class']:42} {100 * chance['miou']:5.1f}% "
      f"{100 * chance['foreground_iou']:14.1f}%")
print("The backbone finds the items (foreground) far better than chance but hardly tells their ten classes\n"
      "apart (weights/README.md says why); per-class IoU: results/demo-knn-seg-backbone.json")
PY

echo "== 4/6 PCA patch maps of val scenes (the backbone)"
mlsctl viz pca "$FEATS/backbone-val" --out "$FEATS/pca-backbone-val.png" --n 16

echo "== 5/6 fmnist-products and a short MILE fine-tune from the backbone (recipes/mile_fmnist_backbone.yaml)"
mlsctl data fmnist-products --out data/fmnist-products
OBJECTS=runs/demo-96-objects.csv  # the photos of the first 96 training objects: 12 steps of 8 sets
python - "$OBJECTS" <<'PY'
import sys
from pathlib import Path
root = Path("data/fmnist-products/train")
rows = ["object_id,path"]
for obj in sorted(p for p in root.iterdir() if p.is_dir())[:96]:
    rows += [f"{obj.name},{obj.name}/{photo.name}" for photo in sorted(obj.glob("*.png"))]
Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[1]).write_text("\n".join(rows) + "\n")
PY
MILE_ARGS=(recipes/mile_fmnist_backbone.yaml optim.epochs=1 optim.batch_size=8 "method.objects_file=$OBJECTS" --out "$MILE")
if [ -f "$MILE/summary.json" ]; then
  echo "reusing $MILE"
elif compgen -G "$MILE/checkpoints/step-*/state.json" > /dev/null; then
  mlsctl pretrain "${MILE_ARGS[@]}" --resume
else
  mlsctl pretrain "${MILE_ARGS[@]}" --overwrite
fi

echo "== 6/6 gallery of the 200 evaluation objects, one image-set search, and the gallery scored"
if [ -f galleries/demo-products/gallery.json ] && [ galleries/demo-products/gallery.json -nt "$MILE/summary.json" ]; then
  echo "reusing galleries/demo-products"
else
  mlsctl index build data/fmnist-products/gallery --run "$MILE" --out galleries/demo-products --overwrite
fi
echo "mlsctl search --set data/fmnist-products/query/ev00007/04.png data/fmnist-products/query/ev00007/05.png --index galleries/demo-products -k 5"
mlsctl search --set data/fmnist-products/query/ev00007/04.png data/fmnist-products/query/ev00007/05.png \
  --index galleries/demo-products -k 5
mkdir -p results  # where ev00007 ranks among all 200 objects
mlsctl search --set data/fmnist-products/query/ev00007/04.png data/fmnist-products/query/ev00007/05.png \
  --index galleries/demo-products -k 200 --json > results/demo-search-ev00007.json 2> /dev/null
python - results/demo-search-ev00007.json <<'PY'
import json, sys
ranked = [r["object"] for r in json.load(open(sys.argv[1]))["results"]]
print(f"the photos show object ev00007: it ranks {ranked.index('ev00007') + 1} of {len(ranked)} "
      f"(a random ranking puts it at {(len(ranked) + 1) / 2:.1f} on average)")
PY
echo "how well the gallery finds each of its 200 objects from 4 other photos of it:"
echo "mlsctl eval retrieval --index galleries/demo-products --query data/fmnist-products/query --noise 0"
mlsctl eval retrieval --index galleries/demo-products --query data/fmnist-products/query --noise 0 \
  --out results/demo-retrieval-index.json
echo "(the backbone's global features do not single the objects out yet, see weights/README.md;"
echo " mlsctl eval retrieval --gallery data/fmnist-products/gallery --query data/fmnist-products/query --run $MILE"
echo " compares MILE's set embeddings with the single-image baselines, with noise)"
echo "demo finished in $(( $(date +%s) - start ))s"
