"""Render the README picture of the demo model: concealed input, reconstruction, unconcealed target.

For a few test identities (people the model never saw), one column per posture; each identity
gets three rows: the concealed scan fed to the model, the reconstruction through the decoder of
the *predicted* posture (as the daemon does), and the unconcealed target. Each reconstruction is
labelled with its SSIM against the target.

    python benchmarks/render_demo_examples.py --data build/demo/data \
        --out docs/img/demo_reconstructions.png [--model edge/demo_bundle] [--identities 3] [--sample 1]

The identities are the first ones of the dataset's test split (dataset.json), so the picture
shows unseen people. Simulated data only: no real person is shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation import ssim  # noqa: E402
from scanner_io.dataset import crop_name, load_crop  # noqa: E402
from scanner_io.frame import POSTURES  # noqa: E402

CELL = 96  # pixels per 64x64 crop in the picture (nearest-neighbour 1.5x)
LABEL_W = 96
HEADER_H = 22


def render(model: Path, data: Path, out: Path, identities: int = 3, sample: int = 1) -> Path:
    """Write the picture and return its path."""
    import cv2
    from PIL import Image, ImageDraw

    from edge.bundle import Bundle
    from edge.runner import Runner

    meta = json.loads((data / "dataset.json").read_text())
    people = meta["test_identities"][:identities]
    keys = [(p, k) for p in people for k in range(len(POSTURES))]
    x = np.stack([load_crop(data / "images" / crop_name(p, k, True, sample)) for p, k in keys])[:, None]
    target = np.stack([load_crop(data / "images" / crop_name(p, k, False, sample)) for p, k in keys])[:, None]
    with Runner.from_bundle(Bundle.open(model), backend="ort") as runner:
        res = runner.infer(x.astype(np.float32), reconstruct=True)
    assert res.reconstruction is not None
    scores = ssim(res.reconstruction, target)

    n_rows = 3 * len(people)
    width = LABEL_W + CELL * len(POSTURES)
    height = HEADER_H + n_rows * CELL + (len(people) - 1) * 6
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(POSTURES):
        draw.text((LABEL_W + k * CELL + 4, 5), name, fill=0)

    def tile(img: np.ndarray) -> Image.Image:
        arr = np.clip(np.rint(img[0] * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(cv2.resize(arr, (CELL, CELL), interpolation=cv2.INTER_NEAREST))

    y = HEADER_H
    for i, person in enumerate(people):
        for r, (label, images) in enumerate(
            (("concealed", x), ("reconstructed", res.reconstruction), ("unconcealed", target))
        ):
            top = y + r * CELL
            draw.text((4, top + CELL // 2 - 12), label, fill=0)
            if r == 0:
                draw.text((4, top + CELL // 2 + 2), f"test {person}", fill=90)
            for k in range(len(POSTURES)):
                j = i * len(POSTURES) + k
                canvas.paste(tile(images[j]), (LABEL_W + k * CELL, top))
                if r == 1:
                    pred = POSTURES[int(res.posture[j])]
                    note = f"SSIM {scores[j]:.2f}" + ("" if pred == POSTURES[k] else f" ({pred}!)")
                    draw.text((LABEL_W + k * CELL + 3, top + CELL - 12), note, fill=255)
        y += 3 * CELL + 6
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset from `thzedge sim dataset`")
    ap.add_argument("--out", type=Path, default=Path("docs/img/demo_reconstructions.png"))
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the shipped demo bundle)")
    ap.add_argument("--identities", type=int, default=3)
    ap.add_argument("--sample", type=int, default=1)
    args = ap.parse_args()
    from edge.bundle import demo_bundle_path

    model = args.model or demo_bundle_path()
    path = render(model, args.data, args.out, args.identities, args.sample)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
