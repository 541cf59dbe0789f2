"""Training-loader throughput: WebDataset shards against torchvision ImageFolder on the same JPEGs.

Repeat with:  .venv/bin/python benchmarks/dataloader.py [--images 2000] [--workers 2] [--rounds 5]

The images are real photographs (scikit-learn's sample photos), cropped at random and resized to
ImageNet's typical sizes (about 500x375, either orientation), saved as JPEG quality 90 in an
ImageNet folder tree, then sharded. Both loaders use the resnet50 recipe's training transforms,
the same batch size and the same worker count; rounds alternate, figures are medians. ImageFolder
runs every step per image in its workers (torchvision's way); the shard loader decodes JPEGs with
libjpeg-turbo (simplejpeg, identical pixels), ships uint8 and normalizes each batch in one
vectorized step in the consuming process (timm's PrefetchLoader does this on the GPU).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.data import make_loader
from pipeline.data.shard import write_shards
from pipeline.data.sources import imagenet_samples
from pipeline.data.transforms import per_image_steps, train_transform
from pipeline.recipes import load_recipe


def make_jpegs(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    rng = random.Random(seed)
    photos = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    for i in tqdm(range(count), desc="writing JPEGs", leave=False):
        photo = photos[i % 2]
        w, h = rng.randint(300, 640), rng.randint(250, 427)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        size = (rng.randint(450, 520), rng.randint(340, 400))
        image = photo.crop((x, y, x + w, y + h)).resize(size if rng.random() < 0.8 else size[::-1])
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"n{i % classes:08d}_{i}.JPEG", quality=90)


def epoch_rate(loader, images_per_epoch: int) -> float:
    start = time.perf_counter()
    seen = sum(batch[0].shape[0] for batch in loader)
    assert seen == images_per_epoch, (seen, images_per_epoch)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "imagenet", Path(tmp) / "shards"
        make_jpegs(root, args.images)
        classes, refs = imagenet_samples(root, "train")
        write_shards(refs, classes, shards, "train", shard_size=250, workers=args.workers)

        recipe = load_recipe("resnet50")
        # torchvision's way: every step per image, float tensors out of the workers.
        transform = v2.Compose([train_transform(recipe["data"]), *per_image_steps(recipe["data"])])
        folder = torch.utils.data.DataLoader(
            ImageFolder(str(root / "train"), transform=transform), batch_size=args.batch_size, shuffle=True,
            num_workers=args.workers, drop_last=True)
        wds_loader = make_loader(shards, "train", args.batch_size, recipe, num_workers=args.workers,
                                 rank=0, world_size=1)
        per_epoch = (args.images // args.batch_size) * args.batch_size
        rates: dict[str, list[float]] = {"ImageFolder + DataLoader": [], "WebDataset shards": []}
        for r in tqdm(range(args.rounds), desc="rounds", leave=False):
            order = list(rates) if r % 2 == 0 else list(rates)[::-1]
            for name in order:
                loader = folder if name.startswith("ImageFolder") else wds_loader
                wds_loader.set_epoch(r)
                rates[name].append(epoch_rate(loader, per_epoch))

    cores = min(args.workers, torch.get_num_threads() or 1) or 1
    print(f"{args.images} JPEGs ~500x375, resnet50 recipe transforms, batch {args.batch_size}, "
          f"{args.workers} workers; medians of {args.rounds} alternating epochs")
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name, value in med.items():
        print(f"  {name:<26} {value:8.1f} img/s   {value / cores:7.1f} img/s per core")
    print(f"  WebDataset / ImageFolder   = {med['WebDataset shards'] / med['ImageFolder + DataLoader']:.3f}"
          "   (target >= 1.0)")


if __name__ == "__main__":
    main()
