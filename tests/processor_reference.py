"""The released processor (transformers 5.23 ``nemotron_h_omni``), run in a child process.

The reference image and video processors import torchvision. The package index's torchvision
builds are CUDA-linked: beside our CPU torch, ``import torchvision`` fails in its meta
registrations ("operator torchvision::nms does not exist"), and since transformers imports
torchvision whenever it can find it, torchvision in the venv would break every transformers
import, megatron's included. So (what we chose):

- ``make setup`` installs torchvision (pinned, ``--no-deps``) into ``.venv/reference``, a folder
  that is *not* on the venv's path, so nothing else can see it;
- this script, run as a child process, declares the two operators torchvision registers fake
  kernels for (``torchvision::nms``, ``torchvision::qnms``) with ``torch.library`` and only
  then puts that folder on ``sys.path``: torchvision imports on the CPU torch, and the processors
  use only its pure-PyTorch transforms. Its compiled ops are never called.

:func:`run` sends a list of requests (pickled) to the child and returns its answers. The
requests are plain data: sizes, texts, uint8 pixels, float waveforms.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PATH = ROOT / ".venv" / "reference"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def available() -> str | None:
    """None when the reference can run, else why not."""
    if not (REFERENCE_PATH / "torchvision").is_dir():
        return f"no torchvision in {REFERENCE_PATH} (run `make setup`)"
    return None


def run(requests: list[dict], timeout: float = 600) -> list:
    """Answers of the reference for ``requests`` (see :func:`_answer`), in order."""
    proc = subprocess.run(
        [sys.executable, __file__],
        input=pickle.dumps(requests),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"reference processor failed:\n{proc.stderr.decode()[-4000:]}")
    return pickle.loads(proc.stdout)


# ---- the child ----------------------------------------------------------------------------


def _import_reference():
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841  (kept alive below)
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.path.insert(0, str(REFERENCE_PATH))
    import torchvision  # noqa: F401

    globals()["_LIB"] = lib
    from transformers import ParakeetFeatureExtractor, PreTrainedTokenizerFast
    from transformers.models.nemotron_h_omni import (
        image_processing_nemotron_h_omni as images,
    )
    from transformers.models.nemotron_h_omni import (
        processing_nemotron_h_omni as processing,
    )
    from transformers.models.nemotron_h_omni import (
        video_processing_nemotron_h_omni as videos,
    )

    return images, videos, processing, ParakeetFeatureExtractor, PreTrainedTokenizerFast


def _answer(req: dict, ref) -> object:
    import numpy as np
    import torch
    from PIL import Image

    images, videos, processing, feature_extractor, fast_tokenizer = ref
    kind = req["kind"]
    if kind == "image_grid":  # [(width, height)] -> [(rows, cols)]
        a = req
        return [
            images.get_patch_grid_size(h, w, a["patch"], 2, a["min_patches"], a["max_patches"])
            for w, h in a["sizes"]
        ]
    if kind == "video_grid":  # [(width, height)] -> [(rows, cols)]
        proc = videos.NemotronH_Omni_Reasoning_V3VideoProcessor(
            video_target_num_patches=req["target"], norm_mean=CLIP_MEAN, norm_std=CLIP_STD
        )
        return [tuple(reversed(proc._compute_target_patches(h, w))) for w, h in req["sizes"]]
    if kind == "audio_tokens":  # [samples] -> [tokens]
        proc = processing.NemotronH_Omni_Reasoning_V3Processor.__new__(
            processing.NemotronH_Omni_Reasoning_V3Processor
        )
        proc.audio_hop_length, proc.audio_subsampling_factor = 160, 8
        return [max(1, proc._estimate_audio_num_embeddings(n)) for n in req["lengths"]]
    if kind == "mel":  # [waveform float32] -> [features [frames, mels]]
        fe = feature_extractor(feature_size=req["mels"])
        out = []
        for wav in req["waves"]:
            got = fe([wav], sampling_rate=16000, return_tensors="pt")
            out.append(got["input_features"][0].numpy())
        return out
    if kind == "process":  # one prompt with its media -> the processor's tensors
        tok = fast_tokenizer(tokenizer_file=str(Path(req["tokenizer"]) / "tokenizer.json"))
        patch_args = dict(min_num_patches=req["min_patches"], max_num_patches=req["max_patches"])
        proc = processing.NemotronH_Omni_Reasoning_V3Processor(
            image_processor=images.NemotronH_Omni_Reasoning_V3ImageProcessor(**patch_args),
            video_processor=videos.NemotronH_Omni_Reasoning_V3VideoProcessor(
                video_target_num_patches=req["video_target"],
                norm_mean=CLIP_MEAN,
                norm_std=CLIP_STD,
            ),
            tokenizer=tok,
            feature_extractor=feature_extractor(feature_size=req["mels"]),
        )
        kwargs = {}
        if req.get("images"):
            kwargs["images"] = [Image.open(__import__("io").BytesIO(b)) for b in req["images"]]
        if req.get("video") is not None:
            from transformers.video_utils import VideoMetadata

            frames, fps, indices = req["video"]
            kwargs["videos"] = [torch.from_numpy(frames).permute(0, 3, 1, 2)]
            kwargs["video_metadata"] = VideoMetadata(
                total_num_frames=len(indices), fps=fps, frames_indices=indices
            )
            kwargs["do_sample_frames"] = False
        if req.get("audio"):
            kwargs["audio"] = [np.asarray(w, dtype=np.float32) for w in req["audio"]]
            kwargs["sampling_rate"] = 16000
        out = proc(text=req["text"], **kwargs)
        answer = {"input_ids": list(out["input_ids"][0])}
        for key in ("pixel_values", "image_grid_hw", "pixel_values_videos", "input_features"):
            if key in out:
                value = out[key]
                answer[key] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        return answer
    raise ValueError(f"unknown request kind {kind!r}")


if __name__ == "__main__":
    requests = pickle.loads(sys.stdin.buffer.read())
    reference = _import_reference()
    answers = [_answer(r, reference) for r in requests]
    sys.stdout.buffer.write(pickle.dumps(answers))
