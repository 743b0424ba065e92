#!/bin/bash
# Make the README's example figures of the generation tools from a trained Flowers102 workdir.
# Usage: make_figures.sh WORKDIR FLOWERS_DIR LABELS_CSV. The labels CSV (header file,hibiscus)
# lists the first 40 images of classes 083-088 with 1 for class 083, the images beside it.
set -e
cd "$(dirname "$0")/../.."
W=${1:?usage: make_figures.sh WORKDIR FLOWERS_DIR LABELS_CSV}
O=docs/figures
F=${2:?flowers folder}
LABELS=${3:?labels CSV}
mkdir -p $O
G=".venv/bin/python -m opengan_jax.generate"
$G one_shot --workdir=$W --output=$O/one_shot.png --num_samples=7 --sources $F/083/image_01696.jpg $F/088/image_00446.jpg $F/090/image_04401.jpg $F/094/image_07304.jpg $F/095/image_07466.jpg $F/100/image_07893.jpg
$G single_source --workdir=$W --output=$O/single_source.png --source=$F/094/image_07304.jpg --num_samples=15
$G intra_class --workdir=$W --output=$O/intra_class.png --sources=$F/094 --num_latents=4 --max_sources=8
$G interpolate --workdir=$W --output=$O/interpolate.png --sources $F/083/image_01696.jpg $F/095/image_07466.jpg --method=slerp
$G random --workdir=$W --output=$O/random.png --stats_from=train
$G tsne --workdir=$W --output=$O/tsne_novel.png --classes=novel
$G class_means --workdir=$W --output=$O/class_means_novel.png --classes=novel
$G attributes --workdir=$W --output=$O/attributes_hibiscus.png --labels="$LABELS" --source=$F/088/image_00446.jpg --classifier=linear
