"""The training loop: DreamBooth-style LoRA on a frozen SD base, under accelerate.

``plan`` checks the dataset and derives the step count before any model is
loaded; ``train`` runs it. Progress, samples and checkpoints are reported
through ``Callbacks``; a ``threading.Event`` stops training cleanly between
steps. All randomness of step k comes from a generator seeded with
(seed, k, process), so a run resumed from a checkpoint at step k continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora.data import scan as dataset
from sdlora.training import hardware
from sdlora.training import adapters as lora_mod
from sdlora.config import DEFAULT_LR, ConfigError, DataConfig, LoraSpec, TrainConfig, default_steps, to_dict
from sdlora.bases.load import Base, load_base, load_tokenizer, native_resolution
from sdlora.runs import (latest_checkpoint, library_versions, load_checkpoint, new_run_dir, now_iso, safe_name,
                   save_checkpoint, write_json)


class TrainingError(RuntimeError):
    """Training stopped on a problem the user must act on (the message says what)."""


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    elapsed: float        # seconds since this process started training
    eta: float            # seconds left, from the mean step time so far


class Callbacks:
    """Override what you need; every method is called on the main process only."""
    def on_plan(self, plan: "Plan") -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_sample(self, step: int, paths: list[Path]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_message(self, text: str) -> None: ...


@dataclass
class Plan:
    """What will be trained, shown before training starts."""
    items: list
    problems: list
    steps: int
    resolution: int
    captions: dict[str, str] = field(default_factory=dict)   # file name -> exact caption


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path | None      # None when cancelled before the end
    steps_done: int
    final_loss: float
    cancelled: bool = False
    peak_memory_bytes: int = 0  # CUDA allocator peak on a GPU, the process's peak RSS on a CPU


def plan(data: DataConfig, cfg: TrainConfig, resolution: int | None = None) -> Plan:
    """Scan the images and derive the settings; raises DatasetError if too few images are usable."""
    folder = Path(data.folder)
    if not data.folder or not folder.is_dir():
        raise ConfigError(f"data folder {data.folder!r} does not exist; pass a folder of images")
    res = data.resolution or resolution or 512
    items, problems = dataset.scan_dataset(folder, data.trigger, data.template, res, tokenizer=load_tokenizer())
    dataset.require_trainable(items, problems, folder)
    steps = cfg.steps or default_steps(len(items))
    return Plan(items, problems, steps, res, {it.path.name: it.caption for it in items})


class _Trainer:
    """State of one training run; ``run`` is the loop."""

    def __init__(self, data: DataConfig, spec: LoraSpec, cfg: TrainConfig, callbacks: Callbacks,
                 cancel: threading.Event | None, base: Base | None):
        from accelerate import Accelerator
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
        self.data, self.spec, self.cfg, self.cb = data, spec, cfg, callbacks
        self.cancel = cancel or threading.Event()
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
        self.main = self.acc.is_main_process
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        self.weight_dtype = base.unet.dtype if base else weight_dtype   # read once: .dtype walks every module
        # The images are checked before the base is loaded: a bad folder costs no model load.
        self.plan = plan(data, cfg, base.resolution if base else native_resolution(cfg.base))
        self.base = base or load_base(cfg.base, dtype=weight_dtype, device=self.acc.device, fresh=True)
        self.lr_source = "set"
        if cfg.lr is None:                       # the base's recommendation, else the SD default
            self.lr_source = "recommended by the base" if self.base.lora_lr else "default for SD bases"
            self.cfg = cfg = replace(cfg, lr=self.base.lora_lr or DEFAULT_LR)
        self.sched = self.base.noise_scheduler()
        self.memory = hardware.PeakMemory(self.acc.device.type)
        self.memory.reset()                      # this run's peak, not the process's (the web UI runs many)

    # ---- data -------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), 77) token ids, padded and truncated as the pipeline does."""
        return self.base.tokenizer(captions, padding="max_length", truncation=True,
                                   max_length=self.base.tokenizer.model_max_length, return_tensors="pt").input_ids

    def frozen_embeds(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The text encoder's output for `ids`, computed once; None when the text encoder trains."""
        if self.spec.text_encoder:
            return None
        with torch.no_grad():
            return self.base.text_encoder(ids.to(self.acc.device))[0].float()

    def cache(self, items, captions: list[str], variants: int = 1) -> None:
        """Latents once per image (and per flip); text embeddings once when the text encoder is frozen,
        of `variants` captions per image (see TrainConfig.word_dropout)."""
        vae = self.base.vae
        latents = []
        with torch.no_grad():
            for it in items:
                x = dataset.to_tensor(dataset.load_image(it.path, self.plan.resolution))[None]
                x = x.to(self.acc.device, vae.dtype)
                sides = [x, x.flip(-1)] if self.data.flip else [x]
                lat = torch.cat([vae.encode(s).latent_dist.mean for s in sides]) * vae.config.scaling_factor
                if not torch.isfinite(lat).all():
                    raise TrainingError(f"the VAE gave non-finite latents for {it.path}; check the image, "
                                        "or use mixed_precision='no' (fp16 VAEs overflow on some images)")
                latents.append(lat.float())
        self.latents = torch.stack(latents)                 # (N, sides, 4, h, w)
        if variants > 1:                                    # (N * variants) captions, image by image
            captions = dataset.caption_variants(captions, self.data.trigger, self.cfg.word_dropout, variants,
                                                self.cfg.seed)
        self.captions = captions
        self.ids = self.tokenize(captions)
        self.embeds = self.frozen_embeds(self.ids)

    def cache_untriggered(self, captions: list[str]) -> None:
        """Token ids (N + 1, 77) of each caption without the trigger, then of the empty caption, for
        the trigger-isolation loss; their base embeddings once when the text encoder is frozen."""
        self.plain_ids = self.tokenize([dataset.without_trigger(c, self.data.trigger) for c in captions] + [""])
        self.plain_embeds = self.frozen_embeds(self.plain_ids)

    def batch(self, g: torch.Generator, latents: torch.Tensor, ids: torch.Tensor, embeds):
        """(latents, text embeddings, caption indices) of a random batch."""
        idx = torch.randint(len(latents), (self.cfg.batch_size,), generator=g)
        side = torch.randint(latents.shape[1], (self.cfg.batch_size,), generator=g)
        lat = latents[idx, side].to(self.acc.device)
        variants = len(ids) // len(latents)
        if variants > 1:                                  # one of each image's caption variants
            idx = idx * variants + torch.randint(variants, (self.cfg.batch_size,), generator=g)
        return lat, self.embed(idx, ids, embeds), idx

    def embed(self, idx: torch.Tensor, ids: torch.Tensor, embeds) -> torch.Tensor:
        if embeds is not None:
            return embeds[idx].to(self.acc.device)
        return self.base.text_encoder(ids[idx].to(self.acc.device))[0]

    def untriggered(self, g: torch.Generator, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings through the LoRA, embeddings of the frozen base) of each image's caption without
        the trigger, or of the empty caption for half of them (at random)."""
        empty = torch.rand(len(idx), generator=g) < 0.5
        pick = torch.where(empty, torch.full_like(idx, len(self.plain_ids) - 1), idx)
        if self.plain_embeds is not None:                 # frozen text encoder: the base's embeddings
            enc = self.plain_embeds[pick].to(self.acc.device)
            return enc, enc
        # the base's pass first: turning adapters off and on again flips the LoRA's requires_grad,
        # which must not happen to weights already in this step's graph
        with torch.no_grad(), lora_mod.adapters_off(self.base.text_encoder):
            frozen = self.base.text_encoder(self.plain_ids[pick].to(self.acc.device))[0]
        return self.embed(pick, self.plain_ids, None), frozen

    # ---- one step ---------------------------------------------------------------------------
    def loss(self, lat: torch.Tensor, enc: torch.Tensor, g: torch.Generator, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The denoising loss; with `idx` (the batch's images) plus trigger_isolation x the distance
        between the model's and the frozen base's predictions without the trigger, on the same noisy latents."""
        noise = torch.randn(lat.shape, generator=g).to(lat.device)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * torch.randn(lat.shape[0], lat.shape[1], 1, 1, generator=g).to(lat.device)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (lat.shape[0],), generator=g).to(lat.device)
        noisy = self.sched.add_noise(lat, noise, t).to(self.weight_dtype)
        v = self.base.prediction_type == "v_prediction"
        target = self.sched.get_velocity(lat, noise, t) if v else noise
        isolate = idx is not None and self.cfg.trigger_isolation > 0
        if isolate:
            plain, plain_base = self.untriggered(g, idx)
            with torch.no_grad(), lora_mod.adapters_off(self.acc.unwrap_model(self.unet)):
                frozen = self.acc.unwrap_model(self.unet)(noisy, t, plain_base.to(self.weight_dtype)).sample.float()
            # one forward for both: the captions with the trigger, then without it
            pred = self.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                             torch.cat([enc, plain]).to(self.weight_dtype)).sample.float()
            target = torch.cat([target, frozen])
        else:
            pred = self.unet(noisy, t, enc.to(self.weight_dtype)).sample.float()
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            # Min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction.
            ac = self.sched.alphas_cumprod.to(lat.device)[t]
            snr = ac / (1 - ac)
            weight = torch.clamp(snr, max=self.cfg.min_snr_gamma) / (snr + 1 if v else snr)
            per = per * (torch.cat([weight, weight]) if isolate else weight)
        if isolate:
            main, kept = per.chunk(2)
            return main.mean() + self.cfg.trigger_isolation * kept.mean()
        return per.mean()

    def step_generator(self, step: int, micro: int) -> torch.Generator:
        world, rank = self.acc.num_processes, self.acc.process_index
        seed = (self.cfg.seed * 1_000_003 + (step * self.cfg.grad_accum + micro) * world + rank) % 2**63
        torch.manual_seed(seed)                           # dropout inside the LoRA layers
        return torch.Generator().manual_seed(seed)

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, run_dir: Path, resume_from: Path | None) -> int:
        from diffusers.optimization import get_scheduler
        base, cfg = self.base, self.cfg
        self.cache(self.plan.items, [it.caption for it in self.plan.items],
                   cfg.caption_variants if cfg.word_dropout else 1)
        self.cache_untriggered(self.captions)
        self.prior = self.prior_examples(run_dir) if self.data.num_class_images else None
        torch.manual_seed(cfg.seed)              # the LoRA A matrices' initial values follow the seed
        lora_mod.inject(base.unet, base.text_encoder, self.spec)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        groups = [{"params": lora_mod.lora_parameters(base.unet), "lr": cfg.lr}]
        if self.spec.text_encoder:
            groups.append({"params": lora_mod.lora_parameters(base.text_encoder), "lr": cfg.text_encoder_lr or cfg.lr})
            base.text_encoder.train()
        for g in groups:                         # trainable weights stay fp32 under mixed precision
            for p in g["params"]:
                p.data = p.data.float()
        self.params = [p for g in groups for p in g["params"]]
        opt = _optimizer(groups, cfg)
        sched = get_scheduler("cosine" if cfg.schedule == "cosine" else "constant_with_warmup", opt,
                              num_warmup_steps=cfg.warmup_steps, num_training_steps=self.plan.steps)
        start = 0
        if resume_from is not None:
            adapters, state = load_checkpoint(resume_from)
            lora_mod.load_adapter_state(base.unet, {k[5:]: v for k, v in adapters.items() if k.startswith("unet.")})
            if self.spec.text_encoder:
                lora_mod.load_adapter_state(base.text_encoder, {k[13:]: v for k, v in adapters.items()
                                                                if k.startswith("text_encoder.")})
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["step"])
        base.unet.train()
        if self.main:
            self.cb.on_message(hardware.runtime_summary(self.acc.device, base.unet, self.weight_dtype,
                                                        cfg.mixed_precision, opt, cfg.gradient_checkpointing))
        self.unet, self.opt, self.lr_sched = self.acc.prepare(base.unet, opt, sched)
        return start

    def prior_examples(self, run_dir: Path):
        """Class images for prior preservation: the user's folder, topped up by the base model's own."""
        from sdlora.config import GenerateConfig
        from sdlora.generate import make_pipeline, render
        folder = Path(self.data.class_folder) if self.data.class_folder else run_dir / "class_images"
        items, _ = dataset.scan_dataset(folder, self.data.trigger, "{trigger}", self.plan.resolution) \
            if folder.is_dir() else ([], [])
        paths = [it.path for it in items][: self.data.num_class_images]
        if len(paths) < self.data.num_class_images:
            out = run_dir / "class_images"
            out.mkdir(exist_ok=True)
            pipe = make_pipeline(self.base)
            for i in range(len(paths), self.data.num_class_images):
                img = render(pipe, GenerateConfig(prompt=self.data.class_prompt, seed=i), self.plan.resolution)
                from sdlora.runs import write_png
                write_png(out / f"class-{i:04d}.png", img)
                paths.append(out / f"class-{i:04d}.png")
            self.cb.on_message(f"generated {len(paths) - len(items)} class images in {out}")
        saved = (self.latents, self.ids, self.embeds)
        self.cache([dataset.Item(p, self.data.class_prompt, "template", (0, 0), []) for p in paths],
                   [self.data.class_prompt] * len(paths))
        prior = (self.latents, self.ids, self.embeds)
        self.latents, self.ids, self.embeds = saved
        return prior

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, run_dir: Path, start: int) -> TrainResult:
        total, cfg = self.plan.steps, self.cfg
        t0, done, loss_value, last_ckpt = time.time(), 0, float("nan"), latest_checkpoint(run_dir)
        log = _open_log(run_dir / "log.csv", start) if self.main else None
        try:
            for step in range(start, total):
                if self.cancel.is_set():
                    self.checkpoint(run_dir, step)
                    return TrainResult(run_dir, None, step, loss_value, cancelled=True)
                loss_value = self.one_step(step)
                if not math.isfinite(loss_value):
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                    raise TrainingError(f"the loss became {loss_value} at step {step + 1}; training stopped and "
                                        f"{where}. Lower the learning rate or use mixed_precision 'no'/'bf16', then "
                                        f"resume from {run_dir}")
                done += 1
                elapsed = time.time() - t0
                info = StepInfo(step + 1, total, loss_value, self.lr_sched.get_last_lr()[0], elapsed,
                                elapsed / done * (total - step - 1))
                if self.main:
                    log.write(f"{step + 1},{loss_value:.6f},{info.lr:.3e},{elapsed:.2f}\n")
                    log.flush()
                    self.cb.on_step(info)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                    last_ckpt = self.checkpoint(run_dir, step + 1)
                if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                    self.samples(run_dir, step + 1)
        finally:
            if log:
                log.close()
        self.checkpoint(run_dir, total)
        peak = self.memory.read()
        if self.main:
            self.cb.on_message(f"{hardware.peak_label(self.memory)}: {hardware.format_bytes(peak)}")
        return TrainResult(run_dir, None, total, loss_value, peak_memory_bytes=peak)

    def one_step(self, step: int) -> float:
        total_loss = 0.0
        for micro in range(self.cfg.grad_accum):
            g = self.step_generator(step, micro)
            with self.acc.accumulate(self.unet), self.acc.autocast():
                lat, enc, idx = self.batch(g, self.latents, self.ids, self.embeds)
                loss = self.loss(lat, enc, g, idx)
                if self.prior is not None:
                    plat, penc, _ = self.batch(g, *self.prior)
                    loss = loss + self.cfg.prior_loss_weight * self.loss(plat, penc, g)
                value = float(loss.detach())
                if not math.isfinite(value):
                    return value
                self.acc.backward(loss)
                self.opt.step()
                self.lr_sched.step() if self.acc.sync_gradients else None
                self.opt.zero_grad(set_to_none=True)
            total_loss += value / self.cfg.grad_accum
        return total_loss

    def checkpoint(self, run_dir: Path, step: int) -> Path | None:
        self.acc.wait_for_everyone()
        if not self.main:
            return None
        adapters = {"unet." + k: v for k, v in lora_mod.adapter_state(self.acc.unwrap_model(self.unet)).items()}
        if self.spec.text_encoder:
            adapters.update({"text_encoder." + k: v for k, v in lora_mod.adapter_state(self.base.text_encoder).items()})
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.lr_sched.state_dict(), "step": step}
        path = save_checkpoint(run_dir, step, adapters, state)
        self.cb.on_checkpoint(step, path)
        return path

    def samples(self, run_dir: Path, step: int) -> None:
        from sdlora.config import GenerateConfig
        from sdlora.generate import make_pipeline, render
        from sdlora.runs import write_png
        if not self.main:
            return
        unet = self.acc.unwrap_model(self.unet)
        unet.eval()
        pipe = make_pipeline(self.base)
        pipe.unet = unet
        paths = []
        for i, prompt in enumerate(self.sample_prompts()):
            for seed in self.cfg.sample_seeds:
                img = render(pipe, GenerateConfig(prompt=prompt, seed=seed), self.plan.resolution)
                path = run_dir / "samples" / f"step-{step:06d}-seed{seed}-{i}.png"
                path.parent.mkdir(exist_ok=True)
                write_png(path, img)
                paths.append(path)
        unet.train()
        self.cb.on_sample(step, paths)

    def sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            return list(self.cfg.sample_prompts)
        first = self.plan.items[0].caption
        without = " ".join(w for w in first.replace(",", " ").split() if w != self.data.trigger)
        return [first, without]


def _open_log(path: Path, start: int):
    """log.csv for appending; on resume, rows past the checkpoint's step (from a killed run) are dropped."""
    if start and path.is_file():
        rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r and int(r.split(",", 1)[0]) <= start]
        from sdlora.safefiles import atomic_write_bytes
        atomic_write_bytes(path, ("".join(r + "\n" for r in rows)).encode("utf-8"))
    return path.open("a", encoding="utf-8")


def _optimizer(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; bitsandbytes' 8-bit AdamW when asked for and available (CUDA only)."""
    if cfg.use_8bit_adam and torch.cuda.is_available():
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
        except ImportError:
            pass
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def train(data: DataConfig, spec: LoraSpec | None = None, cfg: TrainConfig | None = None,
          callbacks: Callbacks | None = None, cancel: threading.Event | None = None,
          resume: str | Path | None = None, base: Base | None = None) -> TrainResult:
    """Train a LoRA and export it; with ``resume`` a run folder, continue that run from its last checkpoint.

    When resuming, the settings are read from the run's config.json (the ones passed in are ignored).
    """
    cb = callbacks or Callbacks()
    resume_from = None
    if resume is not None:
        run_dir = Path(resume)
        data, spec, cfg = read_run_config(run_dir)
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise TrainingError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    spec, cfg = spec or LoraSpec(), cfg or TrainConfig()
    t = _Trainer(data, spec, cfg, cb, cancel, base)
    cfg = t.cfg                                   # with the learning rate resolved
    if resume is None:
        name = safe_name(cfg.run_name or data.trigger)
        run_dir = _shared_run_dir(t, cfg.output_dir, name)
        if t.main:
            write_json(run_dir / "config.json", run_config(data, spec, cfg, t.plan, t.acc.num_processes))
    if t.main:
        cb.on_plan(t.plan)
        if resume is None:
            cb.on_message(f"run folder {run_dir}")
        cb.on_message(f"learning rate {cfg.lr:g} ({t.lr_source})")
    try:
        start = t.setup(run_dir, resume_from)
        if t.main and resume_from is not None:
            cb.on_message(f"resuming {run_dir} at step {start} of {t.plan.steps}")
        try:
            result = t.run(run_dir, start)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _is_oom(e):
                raise
            raise TrainingError(out_of_memory_advice(cfg, t.plan.resolution, run_dir)) from e
        if not result.cancelled and t.main:
            from sdlora.training.export import export_run
            result.lora_path = export_run(t, run_dir)
        t.acc.wait_for_everyone()
        return result
    finally:
        if base is not None:            # a caller's base goes back as it came
            lora_mod.remove_adapters(base.unet)
            lora_mod.remove_adapters(base.text_encoder)
        t.acc.end_training()


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def out_of_memory_advice(cfg: TrainConfig, resolution: int, run_dir: Path) -> str:
    """What to change when training ran out of memory, from the settings actually in use."""
    tips = []
    if cfg.batch_size > 1:
        tips.append(f"batch_size {cfg.batch_size} -> 1 (use grad_accum {cfg.grad_accum * cfg.batch_size} to keep the "
                    "effective batch)")
    if resolution > 512:
        tips.append(f"resolution {resolution} -> 512")
    elif resolution > 256:
        tips.append(f"resolution {resolution} -> {resolution // 2}")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing on")
    if cfg.mixed_precision == "no" and torch.cuda.is_available():
        tips.append("mixed_precision bf16 or fp16")
    if not cfg.use_8bit_adam or not torch.cuda.is_available():
        tips.append("8-bit Adam (install bitsandbytes; CUDA only)")
    tips.append("keep the text encoder frozen so its embeddings stay cached")
    return (f"out of memory while training in {run_dir}. Settings that lower memory: " + "; ".join(tips) +
            ". Start a new run with them (the checkpoints already in the run folder stay)")


def _shared_run_dir(t: _Trainer, output_dir: str, name: str) -> Path:
    """The main process creates the run folder; the others learn its name."""
    from accelerate.utils import broadcast_object_list
    holder = [str(new_run_dir(output_dir, name))] if t.main else [None]
    if t.acc.num_processes > 1:
        broadcast_object_list(holder)
    return Path(holder[0])


def run_config(data: DataConfig, spec: LoraSpec, cfg: TrainConfig, p: Plan, num_processes: int = 1) -> dict:
    return {"data": to_dict(data), "lora": to_dict(spec), "train": to_dict(cfg), "steps": p.steps,
            "num_processes": num_processes,
            "resolution": p.resolution, "captions": p.captions,
            "problems": [{"path": q.path, "reason": q.reason, "fatal": q.fatal} for q in p.problems],
            "versions": library_versions(), "started_at": now_iso()}


def read_run_config(run_dir: Path) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    import json

    from sdlora.config import from_dict
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TrainingError(f"{run_dir} is not an sdlora run folder (no config.json); pass the folder of a run")
    raw = json.loads(path.read_text(encoding="utf-8"))
    train_cfg = dict(raw["train"], steps=raw["steps"])
    return (from_dict(DataConfig, raw["data"]), from_dict(LoraSpec, raw["lora"]), from_dict(TrainConfig, train_cfg))


__all__ = ["train", "plan", "Plan", "Callbacks", "StepInfo", "TrainResult", "TrainingError", "read_run_config"]
