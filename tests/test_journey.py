"""A new user's first hour (issue 21), as one ordered journey on one export.

The model is written like upstream's published 7B YAML (every key of that file, sizes scaled down,
no ``head_dim``, no ``txt_dim``) with a random checkpoint in upstream's format, a tiny T5 directory
and a tiny Wan2.2 VAE. The steps run in file order and share :class:`Journey` (a later step uses an
earlier one's output): inspect → export (T5 + VAE, all aspects) → generate by prompt at two aspects →
I2V from a PNG → V2V from an mp4 → embeddings → mp4 → score → calibrate int8 → verify → generate on
the INT8 export → serve the FP32 export → build --dry-run. Every step checks its output (shapes,
frame counts, parity with the Python API or the PyTorch reference). The journey table (step,
seconds, status, what was checked) is printed at the end (``-s``) and written to
``journey.json`` under the pytest tmp dir (its path is printed too).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow

from click.testing import CliRunner  # noqa: E402

from starflow_trt.cli import main  # noqa: E402

PUBLISHED_7B = Path(__file__).resolve().parent / "data" / "upstream_configs" / "starflow-v_7B_t2v_caus_480p.yaml"

#: the published 7B file, key for key and in its order, with sizes scaled down (img_size 64 → a 4x4 latent
#: grid at 1:1, 9 frames → 3 latent frames, widths 64 / 128 = head_dim 64 (absent: upstream's default) x 1 / 2,
#: two flow blocks laid out like the 7B's last two: a flip-within-frame shallow block under an identity top block)
JOURNEY_YAML = """\
arguments:
- no_flip: 1
- fsdp: 1
- fsdp_text_encoder: 1
- img_size: 64
- secondary_img_size: 48
- txt_size: 8
- vid_size: '9:16'
- fps_cond: 1
- channel_size: 4
- patch_size: 1
- channels: 64
- top_block_channels: 128
- blocks: 2
- layers_per_block: 1 2
- noise_std: 0.5
- batch_size: 192
- secondary_batch_size: 1536
- secondary_ratio: 0.2
- lr: 5e-5
- min_lr: 1e-6
- nvp: 1
- rope: 1
- adaln: 0
- sos: 1
- seq_order: L2R
- pt_seq_len: 4
- wds: 1
- mix_aspect: 1
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- cond_noise_level: 1
- temporal_causal: 2
- shallow_block_local: 1
- gradient_checkpoint: 1
- gradient_checkpoint_mlp: 1
- vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6
- finetuned_vae: none
- text: google/flan-t5-xl
- cfg: 2.5
- drop_label: 0.1
- drop_image: 0.25
- loss_scaling: 1
- grad_clip: 1
- grad_skip: 1
- sample_freq: 100000
- soft_clip: 4
"""

T5_WIDTH = 32            # the tiny T5's d_model: txt_dim comes from it (checkpoint and --text-encoder)
PROMPT = "a red square moving right"
OTHER_PROMPT = "a blue circle moving left"
GUIDANCE = 2.0
SEED = 3
FPS = 16
#: pixel frame (H, W) and latent token grid (h, w) per aspect: img_size 64 → area 64², multiple 16
FRAMES = {"9:16": ((80, 48), (5, 3)), "16:9": ((48, 80), (3, 5))}
LATENT_FRAMES, VIDEO_FRAMES = 3, 9


def make_journey_model(root: Path) -> dict[str, Path]:
    """config.yaml, model.pth (random, upstream's key layout), t5/ (tiny T5), vae/ (tiny Wan2.2), in.png."""
    from PIL import Image

    from starflow_trt.checkpoint import save_state_dict
    from starflow_trt.config import parse_config
    from starflow_trt.media.tiny import make_t5_dir, make_vae
    from starflow_trt.reference import build_model

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(JOURNEY_YAML)
    cfg = parse_config(JOURNEY_YAML).with_text_width(T5_WIDTH, "the tiny T5")
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # no layer left at its (often zero / identity) init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_state_dict(model.state_dict(), root / "model.pth")
    make_t5_dir(root / "t5", d_model=T5_WIDTH)
    make_vae(seed=2, z_dim=4, num_res_blocks=1).save_pretrained(root / "vae")   # 1 res block: export time
    img = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / "in.png")
    return {"config": root / "config.yaml", "checkpoint": root / "model.pth", "t5": root / "t5",
            "vae": root / "vae", "png": root / "in.png"}


class Journey:
    """Paths, results shared between steps, and the timing table."""

    def __init__(self, root: Path, paths: dict[str, Path]):
        self.root, self.paths = root, paths
        self.rows: list[dict] = []
        self.state: dict = {}
        self._pipes: dict = {}

    @contextmanager
    def step(self, name: str, checked: str) -> Iterator[None]:
        t0 = time.perf_counter()
        row = {"step": name, "seconds": None, "status": "FAILED", "checked": checked}
        self.rows.append(row)
        try:
            yield
            row["status"] = "ok"
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 2)

    def cli(self, *args, code: int = 0) -> str:
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == code, f"starflow-trt {' '.join(map(str, args))}: exit {res.exit_code}\n{res.output}"
        return res.output

    def pipe(self, name: str = "fp32"):
        """An in-process Pipeline of an export (ORT CPU, per-session pools: calibrate runs in this process)."""
        if name not in self._pipes:
            from starflow_trt.runtime import Pipeline

            self._pipes[name] = Pipeline.from_dir(self.root / name, backend="ort")
        return self._pipes[name]

    def reference(self):
        if "reference" not in self._pipes:
            from starflow_trt.reference import load_reference

            self._pipes["reference"] = load_reference(self.paths["config"], self.paths["checkpoint"])
        return self._pipes["reference"]

    def close(self) -> None:
        for name, p in self._pipes.items():
            if name != "reference":
                p.close()

    def table(self) -> str:
        lines = [f"{'step':34} {'seconds':>8} {'status':7} checked"]
        lines += [f"{r['step']:34} {r['seconds'] if r['seconds'] is not None else '-':>8} {r['status']:7} "
                  f"{r['checked']}" for r in self.rows]
        total = sum(r["seconds"] or 0 for r in self.rows)
        return "\n".join(lines + [f"{'total':34} {total:>8.2f}"])


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    root = tmp_path_factory.mktemp("journey")
    t0 = time.perf_counter()
    paths = make_journey_model(root / "model")
    j = Journey(root, paths)
    j.rows.append({"step": "fixtures (yaml, ckpt, T5, VAE, PNG)", "seconds": round(time.perf_counter() - t0, 2),
                   "status": "ok", "checked": "-"})
    try:
        yield j
    finally:
        j.close()
        report = root / "journey.json"
        report.write_text(json.dumps({"steps": j.rows}, indent=1))
        print(f"\n\njourney (issue 21):\n{j.table()}\njourney table: {report}")


def _generate_args(j: Journey, src: str, out: str, *extra) -> list:
    return ["generate", j.root / src, "--seed", SEED, "--guidance", GUIDANCE, "--fps", FPS,
            "--thread-pool", "session", "-o", j.root / out, *extra]


def _cli_jacobi(pipe):
    """The Jacobi options ``generate`` uses by default (the CLI's defaults)."""
    from starflow_trt.runtime import JacobiConfig

    g = pipe.geo
    return JacobiConfig(block_size=16, max_iter=32, threshold=1e-3, window=g.local_attn_window or g.max_frames)


def _video(path: Path) -> np.ndarray:
    from starflow_trt.media.io import load_video

    return load_video(path)[0]   # [F, H, W, 3] uint8


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


# ---------------------------------------------------------------------------------------------- steps
def test_01_inspect(journey):
    j = journey
    with j.step("inspect", "exit 0; params = reference model's; defaults line (head_dim 64, txt_dim by source)"):
        from starflow_trt.config import parse_config
        from starflow_trt.reference import build_model

        published = [next(iter(d)) for d in yaml.safe_load(PUBLISHED_7B.read_text())["arguments"]]
        assert [next(iter(d)) for d in yaml.safe_load(JOURNEY_YAML)["arguments"]] == published
        out = j.cli("inspect", j.paths["config"])
        assert "head_dim 64" in out and "txt_dim 2048 (from the width of text encoder google/flan-t5-xl)" in out
        out = j.cli("inspect", j.paths["config"], j.paths["checkpoint"])
        assert "txt_dim 32 (from the checkpoint's blocks.1.proj_txt.weight)" in out and "OK (all keys" in out
        cfg = parse_config(JOURNEY_YAML).with_text_width(T5_WIDTH, "t5")
        params = sum(p.numel() for p in build_model(cfg, "meta").parameters())
        assert f"total (with denoiser) {params:,}" in out
        out = j.cli("inspect", j.paths["config"], j.paths["checkpoint"], "--text-encoder", j.paths["t5"])
        assert "txt_dim 32 (from --text-encoder" in out
        assert "ignored training-only keys: no_flip, fsdp" in out and "kept unknown" not in out


def test_02_export(journey):
    j = journey
    with j.step("export fp32 (T5 + VAE, all aspects)", "graphs incl. text/VAE; nine aspects; txt_dim 32"):
        from starflow_trt.export.manifest import load_manifest
        from starflow_trt.geometry import UPSTREAM_ASPECTS

        out = j.cli("export", j.paths["config"], j.paths["checkpoint"], "--text-encoder", j.paths["t5"],
                    "--vae", j.paths["vae"], "--aspects", "all", "--max-batch", "2", "-o", j.root / "fp32")
        assert "9:16 5x3" in out
        m = load_manifest(j.root / "fp32")
        assert {"text_encoder", "vae_decode_first", "vae_decode_step", "deep_step", "denoiser"} <= set(m.graphs)
        assert any(name.startswith("vae_encode") for name in m.graphs)
        g = m.geometry
        assert g.aspect_names == UPSTREAM_ASPECTS and (g.h, g.w) == FRAMES["16:9"][1]
        assert g.text_width == T5_WIDTH and m.config.txt_dim == T5_WIDTH and g.max_frames == LATENT_FRAMES
        assert m.config.head_dim == 64


def test_03_generate_prompt_two_aspects(journey):
    j = journey
    with j.step("generate --prompt at 9:16 and 16:9", "mp4 9 frames at each aspect's size; latents = Pipeline"):
        pipe = j.pipe()
        for aspect in ("9:16", "16:9"):
            (H, W), (h, w) = FRAMES[aspect]
            out = f"gen_{aspect.replace(':', 'x')}"
            j.cli(*_generate_args(j, "fp32", out, "--prompt", PROMPT, "--aspect", aspect))
            latents = np.load(j.root / out / "latents.npy")
            assert latents.shape == (1, LATENT_FRAMES, 4, h, w)
            video = _video(j.root / out / "video.mp4")
            assert video.shape == (VIDEO_FRAMES, H, W, 3)
            want = pipe.generate(prompt=[PROMPT], seed=SEED, guidance=GUIDANCE, fps=FPS, aspect=aspect,
                                 jacobi=_cli_jacobi(pipe))
            assert _max_err(latents, want.latents) < 1e-5
            assert tuple(want.video.shape) == (1, VIDEO_FRAMES, 3, H, W)   # (the mp4 is lossy: shape only)
            j.state[aspect] = {"latents": latents, "video": want.video}


def test_04_reference_parity(journey):
    j = journey
    with j.step("flow + denoiser vs PyTorch reference (9:16)", "AR latents, denoised latents, NLL within 1e-4"):
        pipe, ref = j.pipe(), j.reference()
        y, yu = pipe.encode_text([PROMPT], fps=FPS, aspect="9:16")
        (_, (h, w)) = FRAMES["9:16"]
        noise = torch.randn(1, LATENT_FRAMES, 4, h, w, generator=torch.Generator().manual_seed(7))
        ours = pipe.generate(y, yu, noise=noise, guidance=GUIDANCE, aspect="9:16")
        raw = ref.sample(noise, y, yu, guidance=GUIDANCE)
        scale = float(raw.abs().max())
        assert _max_err(ours.raw, raw) <= 1e-4 * scale + 1e-4
        assert _max_err(ours.latents, ref.denoise(raw, y)) <= 1e-4 * scale + 1e-4
        nll, _ = pipe.score(raw, y)
        torch.testing.assert_close(nll, ref.nll(raw, y).float(), rtol=1e-4, atol=1e-5)


def test_05_image_to_video(journey):
    j = journey
    with j.step("generate --image PNG (I2V, 9:16)", "mp4 9 frames 80x48; latents = Pipeline(image=...)"):
        (H, W), (h, w) = FRAMES["9:16"]
        j.cli(*_generate_args(j, "fp32", "i2v", "--prompt", PROMPT, "--aspect", "9:16", "--image", j.paths["png"]))
        latents = np.load(j.root / "i2v" / "latents.npy")
        assert latents.shape == (1, LATENT_FRAMES, 4, h, w)
        assert _video(j.root / "i2v" / "video.mp4").shape == (VIDEO_FRAMES, H, W, 3)
        pipe = j.pipe()
        want = pipe.generate(prompt=[PROMPT], image=str(j.paths["png"]), seed=SEED, guidance=GUIDANCE, fps=FPS,
                             aspect="9:16", jacobi=_cli_jacobi(pipe))
        assert _max_err(latents, want.latents) < 1e-5
        assert _max_err(latents, j.state["9:16"]["latents"]) > 1e-3   # the image changed the video


def test_06_video_to_video(journey):
    j = journey
    with j.step("generate --video mp4 (V2V, 16:9)", "mp4 9 frames 48x80; latents = Pipeline(video=...)"):
        from starflow_trt.media.io import write_video

        (H, W), (h, w) = FRAMES["16:9"]
        clip = j.root / "v2v_in.mp4"   # the first 5 frames of the 16:9 run: 2 latent context frames of 3
        write_video(_video(j.root / "gen_16x9" / "video.mp4")[:5], clip, FPS)
        j.cli(*_generate_args(j, "fp32", "v2v", "--prompt", OTHER_PROMPT, "--aspect", "16:9", "--video", clip))
        latents = np.load(j.root / "v2v" / "latents.npy")
        assert latents.shape == (1, LATENT_FRAMES, 4, h, w)
        assert _video(j.root / "v2v" / "video.mp4").shape == (VIDEO_FRAMES, H, W, 3)
        pipe = j.pipe()
        want = pipe.generate(prompt=[OTHER_PROMPT], video=str(clip), seed=SEED, guidance=GUIDANCE, fps=FPS,
                             aspect="16:9", jacobi=_cli_jacobi(pipe))
        assert _max_err(latents, want.latents) < 1e-5


def test_07_embeddings_to_mp4(journey):
    j = journey
    with j.step("generate --text-embeddings → mp4", "latents = the prompt run's; video.mp4 9 frames 80x48"):
        (H, W), _ = FRAMES["9:16"]
        y, yu = j.pipe().encode_text([PROMPT], fps=FPS, aspect="9:16")
        np.save(j.root / "y.npy", y.numpy())
        np.save(j.root / "u.npy", yu.numpy())
        j.cli(*_generate_args(j, "fp32", "emb", "--text-embeddings", j.root / "y.npy", "--uncond", j.root / "u.npy",
                              "--aspect", "9:16"))
        assert _max_err(np.load(j.root / "emb" / "latents.npy"), j.state["9:16"]["latents"]) < 1e-5
        assert (j.root / "emb" / "video.mp4").is_file(), "generate --text-embeddings on a VAE export wrote no mp4"
        assert _video(j.root / "emb" / "video.mp4").shape == (VIDEO_FRAMES, H, W, 3)


def test_08_score(journey):
    j = journey
    with j.step("score --video DIR (9:16 + 16:9 clips)", "per-file NLL = reference NLL (rtol 1e-4)"):
        clips = j.root / "clips"
        clips.mkdir()
        xs = [j.state["9:16"]["latents"], j.state["16:9"]["latents"]]
        for i, x in enumerate(xs):
            np.save(clips / f"{i}.npy", x)
        y, _ = j.pipe().encode_text([PROMPT, PROMPT], fps=FPS)
        np.save(j.root / "y2.npy", y.numpy())
        out = j.cli("score", j.root / "fp32", "--video", clips, "--text-embeddings", j.root / "y2.npy")
        scores = json.loads(out.strip().splitlines()[-1])
        assert [len(f["nll"]) for f in scores["files"]] == [1, 1]
        ref = j.reference()
        want = [float(ref.nll(torch.from_numpy(x), y[i:i + 1])) for i, x in enumerate(xs)]
        np.testing.assert_allclose(scores["nll"], want, rtol=1e-4, atol=1e-5)


def test_09_calibrate_int8(journey):
    j = journey
    with j.step("calibrate int8 (--samples 2 of 3)", "int8 manifest; 2 prompts captured; gate numbers finite"):
        from starflow_trt.export.manifest import load_manifest

        prompts = [PROMPT, OTHER_PROMPT, "a green triangle moving up"]   # 6 captions > the graph's 4 rows
        y, yu = j.pipe().encode_text(prompts, fps=FPS)
        one, one_u = j.pipe().encode_text(prompts[2:], fps=FPS)
        assert _max_err(y[2:], one) < 1e-5 and _max_err(yu[2:], one_u) < 1e-5
        np.save(j.root / "cal_y.npy", y.numpy())
        np.save(j.root / "cal_u.npy", yu.numpy())
        j.cli("calibrate", j.root / "fp32", "--precision", "int8", "--text-embeddings", j.root / "cal_y.npy",
              "--uncond", j.root / "cal_u.npy", "--samples", "2", "--guidance", GUIDANCE, "--ignore-gate",
              "-o", j.root / "int8")
        m = load_manifest(j.root / "int8")
        assert m.precision == "int8" and m.extra["calibration"]["prompts"] == 2
        assert m.graph("deep_step").precision == "int8"
        q = m.extra["quality"]
        assert np.isfinite([q["bpd_fp32"], q["bpd"], q["latent_psnr_db"]]).all()
        j.state["int8_psnr_db"] = q["latent_psnr_db"]


def test_10_verify(journey):
    j = journey
    with j.step("verify int8 against fp32", "exit 0; every graph of the INT8 export within its tolerance"):
        from starflow_trt.export.manifest import load_manifest

        report = j.root / "verify.json"
        j.cli("verify", j.root / "int8", "--calls", "2", "--report", report)   # exit 0: every graph within tol
        data = json.loads(report.read_text())
        assert data["passed"] and {g["name"] for g in data["graphs"]} == set(load_manifest(j.root / "int8").graphs)
        worst = max(g["rel_l2"] for g in data["graphs"])
        j.rows[-1]["checked"] += f" (worst rel L2 {worst:.3f})"


def test_11_generate_int8(journey):
    j = journey
    with j.step("generate --prompt on the INT8 export", "mp4 9 frames 80x48; latents close to FP32 (PSNR)"):
        from starflow_trt.calibration.calibrate import psnr

        (H, W), (h, w) = FRAMES["9:16"]
        j.cli(*_generate_args(j, "int8", "gen_int8", "--prompt", PROMPT, "--aspect", "9:16"))
        latents = np.load(j.root / "gen_int8" / "latents.npy")
        assert latents.shape == (1, LATENT_FRAMES, 4, h, w) and np.isfinite(latents).all()
        assert _video(j.root / "gen_int8" / "video.mp4").shape == (VIDEO_FRAMES, H, W, 3)
        db = psnr(torch.from_numpy(latents), torch.from_numpy(j.state["9:16"]["latents"]))
        j.rows[-1]["checked"] += f" ({db:.1f} dB)"
        assert db > 10


@contextmanager
def _service(directory: Path) -> Iterator[str]:
    """Ray Serve on loopback for ``directory`` (tests/test_serving.py's cluster; every process it started is
    checked gone afterwards)."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("psutil")
    from starflow_trt.serving.app import ServeConfig

    from .test_serving import local_service

    cfg = ServeConfig(max_ongoing=4, max_queued=4, timeout_s=300, batch_wait_s=1.0,
                      videos_dir=str(directory.parent / "videos"))
    with local_service(directory, cfg) as svc:
        yield svc.url


def test_12_serve(journey):
    j = journey
    with j.step("serve fp32: prompt at 9:16 (+ 2 concurrent)", "PNG frames 80x48 = Pipeline ±1; mp4; batch = solo"):
        from starflow_trt.runtime import JacobiConfig
        from starflow_trt.serving.client import VideoClient

        pipe = j.pipe()
        (H, W), _ = FRAMES["9:16"]
        with _service(j.root / "fp32") as url:
            client = VideoClient(url, timeout=300)
            body = {"prompt": PROMPT, "seed": SEED, "guidance": GUIDANCE, "aspect": "9:16", "fps": FPS, "mp4": True}
            video = client.generate(body)
            frames = np.stack(video.frames)
            assert frames.shape == (VIDEO_FRAMES, H, W, 3) and frames.dtype == np.uint8
            want = pipe.generate(prompt=[PROMPT], seed=SEED, guidance=GUIDANCE, fps=FPS, aspect="9:16",
                                 jacobi=JacobiConfig(16, 32, 1e-3), on_frame=lambda i, f: None)
            assert int(np.abs(frames.astype(int) - want.video[0].permute(0, 2, 3, 1).numpy().astype(int)).max()) <= 1
            assert video.mp4 is not None and video.mp4[4:8] == b"ftyp"
            # two requests at once share a batch (token-by-token: exact) and equal their solo results
            bodies = [{"prompt": p, "seed": s, "guidance": GUIDANCE, "aspect": "9:16", "fps": FPS,
                       "sampler": "autoregressive"} for p, s in ((PROMPT, 5), (OTHER_PROMPT, 6))]
            results: dict = {}

            def run(i: int) -> None:
                try:
                    results[i] = client.generate(bodies[i])
                except Exception as exc:  # noqa: BLE001 - reported below
                    results[i] = exc

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            for i, b in enumerate(bodies):
                got = results[i]
                assert not isinstance(got, Exception), got
                assert got.stats["batch_size"] == 2, got.stats
                solo = pipe.generate(prompt=[b["prompt"]], seed=b["seed"], guidance=GUIDANCE, fps=FPS, aspect="9:16",
                                     jacobi=None, on_frame=lambda i, f: None)
                diff = np.stack(got.frames).astype(int) - solo.video[0].permute(0, 2, 3, 1).numpy().astype(int)
                assert int(np.abs(diff).max()) <= 1


def test_13_build_dry_run(journey):
    j = journey
    with j.step("build --dry-run (fp32, int8)", "a plan per graph; profiles cover the largest grid"):
        from starflow_trt.export.manifest import load_manifest

        for name in ("fp32", "int8"):
            plan = json.loads(j.cli("build", j.root / name, "--dry-run"))
            m = load_manifest(j.root / name)
            assert set(plan["graphs"]) == set(m.graphs)
            deep = plan["graphs"]["deep_step"]["profile"]
            assert deep and all(len(v) == 3 for v in deep.values())
