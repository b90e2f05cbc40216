"""Video fine-tuning: VideoMAE's classifier on clips, multi-view clip-level top-1."""

from fastmae.eval.protocols.registry import ProtocolSpec, register_protocol
from fastmae.eval.video import PRESETS, VideoFinetuneConfig, run_video_finetune


def run(cfg: VideoFinetuneConfig, split=None, source_sd=None, source_meta=None) -> dict:
    if split is not None or source_sd is not None:
        raise ValueError("finetune-video reads clips and a checkpoint from disk (--data, --ckpt)")
    return run_video_finetune(cfg)


register_protocol(ProtocolSpec(
    name="finetune-video", help="VideoMAE fine-tuning on clip folders", config=VideoFinetuneConfig, presets=PRESETS,
    run=run, images=False))
