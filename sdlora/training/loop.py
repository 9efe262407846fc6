"""The training loop: DreamBooth-style LoRA on a frozen SD base, under accelerate.

``train`` checks the dataset and derives the settings (``training.plan``) before any model is
loaded, caches the examples (``training.batches``), minimises ``training.objective`` and exports
(``training.export``). Progress, samples and checkpoints are reported through ``Callbacks``; a
``threading.Event`` stops training cleanly between steps. All randomness of step k comes from a
generator seeded with (seed, k, process), so a run resumed from a checkpoint at step k continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from sdlora import runs
from sdlora.bases.load import Base, load_base, load_vae, native_geometry
from sdlora.bases.precision import QUANTIZED, bitsandbytes, precision_of, storage_dtype
from sdlora.config import (ConfigError, DataConfig, GenerateConfig, LoraSpec, TrainConfig, base_precision,
                           isolation_method)
from sdlora.data import captions as captioning
from sdlora.data import scan as dataset
from sdlora.training import adapters, calibrate, hardware
from sdlora.training.batches import BasePictures, Batches, TrainingError, Untriggered
from sdlora.training.events import Callbacks, StepInfo, TrainResult
from sdlora.training.objective import TEXT_ISOLATION_SCALE, KeyValueIsolation, Objective
from sdlora.training.plan import Plan, plan, resolve


def check_isolation(spec: LoraSpec, cfg: TrainConfig) -> None:
    """Text isolation holds only adapters that read the prompt alone: refuse, before anything loads, the settings
    with adapters it cannot hold (they would restyle every prompt, the trigger no switch)."""
    if not cfg.trigger_isolation or isolation_method(spec, cfg) != "text":
        return
    fix = "use isolation 'pass' (--isolation pass: a second U-Net pass per step), or trigger_isolation 0"
    if spec.cross_attention != "kv" or spec.self_attention or spec.extra_targets:
        raise ConfigError(f"isolation='text' keeps only cross-attention key/value adapters selective, and these "
                          f"settings also adapt {', '.join(t for t in spec.unet_targets() if 'attn2.to_k' not in t and 'attn2.to_v' not in t)}: "
                          f"set cross_attention 'kv' without self-attention, or {fix}")
    if spec.text_encoder:
        raise ConfigError(f"isolation='text' keeps the untriggered prompts' text states as they are, so the text "
                          f"encoder must stay frozen: set text_encoder off, or {fix}")
    if spec.adapter != "lora":
        raise ConfigError(f"isolation='text' needs plain LoRA adapters (adapter 'lora', not {spec.adapter!r}): {fix}")


class _Trainer:
    """State of one training run; ``run`` is the loop."""

    def __init__(self, data: DataConfig, spec: LoraSpec, cfg: TrainConfig, callbacks: Callbacks,
                 cancel: threading.Event | None, base: Base | None):
        from accelerate import Accelerator
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
        check_isolation(spec, cfg)
        self.data, self.cb = data, callbacks
        self.cancel = cancel or threading.Event()
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
        self.main = self.acc.is_main_process
        compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        self.precision = base_precision(cfg)
        if base is not None and cfg.base_precision != "auto" and precision_of(base.unet) != self.precision:
            raise ConfigError(f"base_precision={cfg.base_precision!r} but the base given is "
                              f"{precision_of(base.unet)}: load it with that precision, or leave base_precision auto")
        if self.precision in QUANTIZED:
            bitsandbytes()                       # a missing package is said before the images are read
        weight_dtype = storage_dtype(self.precision, compute, self.acc.device)
        self.weight_dtype = base.unet.dtype if base else weight_dtype   # read once: .dtype walks every module
        # The images are checked before the base is loaded: a bad folder costs no model load.
        self.plan = plan(data, cfg, base.geometry if base else native_geometry(cfg.base))
        self.base = base or load_base(cfg.base, dtype=compute, device=self.acc.device, fresh=True,
                                      precision=self.precision, quantize_text_encoder=not spec.text_encoder)
        if cfg.vae:                              # the run's own VAE (e.g. an fp16-safe one), in the base's dtype
            self.base.vae = load_vae(cfg.vae, self.base.vae).to(self.acc.device, self.base.vae.dtype)
        self.spec, self.cfg, sources = resolve(spec, cfg, len(self.plan.items), self.base)
        self.lr_source, self.steps_source, self.plan.steps = sources["lr"], sources["steps"], self.cfg.steps
        self.objective = Objective(self.base.noise_scheduler(), self.base.prediction_type, self.cfg,
                                   self.weight_dtype)
        self.batches = Batches(self.base, self.acc.device, self.cfg.batch_size, data.flip, self.spec.text_encoder)
        self.memory = hardware.PeakMemory(self.acc.device.type)
        self.memory.reset()                      # this run's peak, not the process's (the web UI runs many)
        self._pipe = None

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, run_dir: Path, resume_from: Path | None) -> int:
        from diffusers.optimization import get_scheduler

        from sdlora.loras.check import base_module_sets
        base, cfg, spec = self.base, self.cfg, self.spec
        self.captions = [it.caption for it in self.plan.items]
        if cfg.word_dropout or cfg.shuffle_tags:  # caption_variants captions per image, image by image
            self.captions = captioning.caption_variants(self.captions, self.data.trigger, cfg.word_dropout,
                                                        cfg.caption_variants, cfg.seed, cfg.shuffle_tags,
                                                        cfg.keep_tags)
        self.examples = self.batches.cache([it.path for it in self.plan.items], self.captions,
                                           [f.bucket for f in self.plan.fits], [it.size for it in self.plan.items])
        self.untriggered = Untriggered(self.batches, self.captions, self.data.trigger)
        self.prior = self.prior_examples(run_dir) if self.data.num_class_images else None
        self.pictures = None       # drawn before the adapters go in: the base's own pictures
        if cfg.trigger_isolation and isolation_method(spec, cfg) == "pass" and cfg.isolation_images == "base":
            self.pictures = self.base_pictures(run_dir)
        self.module_sets = base_module_sets(base)     # the base's own names, for the export's key check
        torch.manual_seed(cfg.seed)              # the LoRA A matrices' initial values follow the seed
        self.adalora = adapters.inject(base.unet, base.text_encoders, spec, total_steps=self.plan.steps).adalora
        self.kv_isolation = None
        if cfg.trigger_isolation and isolation_method(spec, cfg) == "text":
            layers = adapters.key_value_layers(base.unet)
            states = self.untriggered.embeds.rows(torch.arange(len(self.untriggered.ids))).hidden
            self.kv_isolation = KeyValueIsolation(layers, states)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        groups = [{"params": adapters.lora_parameters(base.unet), "lr": cfg.lr}]
        if spec.text_encoder:
            params = [p for te in base.text_encoders.values() for p in adapters.lora_parameters(te)]
            groups.append({"params": params, "lr": cfg.text_encoder_lr or cfg.lr})
            for te in base.text_encoders.values():
                te.train()
        for g in groups:                         # trainable weights stay fp32 under mixed precision
            for p in g["params"]:
                p.data = p.data.float()
        self.params = [p for g in groups for p in g["params"]]
        opt = _optimizer(groups, cfg)
        sched = get_scheduler("cosine" if cfg.schedule == "cosine" else "constant_with_warmup", opt,
                              num_warmup_steps=cfg.warmup_steps, num_training_steps=self.plan.steps)
        start = self.restore(resume_from, opt, sched) if resume_from is not None else 0
        base.unet.train()
        if self.main:
            self.cb.on_message(hardware.memory_estimate(base, sum(p.numel() for p in self.params), cfg,
                                                        self.plan.resolution, self.precision, self.acc.device))
            self.cb.on_message(hardware.runtime_summary(self.acc.device, base.unet, self.precision,
                                                        cfg.mixed_precision, opt, cfg.gradient_checkpointing,
                                                        rest=self.weight_dtype))
        self.unet, self.opt, self.lr_sched = self.acc.prepare(base.unet, opt, sched)
        self.bare_unet = self.acc.unwrap_model(self.unet)
        return start

    def restore(self, checkpoint: Path, opt, sched) -> int:
        """Adapter weights, optimizer and schedule from a checkpoint; returns its step."""
        tensors, state = runs.load_checkpoint(checkpoint)
        adapters.load_adapter_state(self.base.unet, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        if self.spec.text_encoder:
            for component, te in self.base.text_encoders.items():
                n = len(component) + 1
                adapters.load_adapter_state(te, {k[n:]: v for k, v in tensors.items()
                                                 if k.startswith(component + ".")})
        if self.adalora is not None:
            if "adalora" not in state:
                raise TrainingError(f"{checkpoint} holds no AdaLoRA rank state; it was not written by an AdaLoRA run")
            self.adalora.load_state(state["adalora"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return int(state["step"])

    def prior_examples(self, run_dir: Path):
        """Class images for prior preservation: the user's folder, topped up by the base model's own."""
        folder = Path(self.data.class_folder) if self.data.class_folder else run_dir / "class_images"
        items, _ = dataset.scan_dataset(folder, self.data.trigger, "{trigger}", self.plan.resolution) \
            if folder.is_dir() else ([], [])
        paths = [it.path for it in items][: self.data.num_class_images]
        if len(paths) < self.data.num_class_images:
            out = run_dir / "class_images"
            out.mkdir(exist_ok=True)
            for i in range(len(paths), self.data.num_class_images):
                runs.write_png(out / f"class-{i:04d}.png", self.render(self.data.class_prompt, i))
                paths.append(out / f"class-{i:04d}.png")
            self.cb.on_message(f"generated {len(paths) - len(items)} class images in {out}")
        square = (self.plan.resolution, self.plan.resolution)
        return self.batches.cache(paths, [self.data.class_prompt] * len(paths), [square] * len(paths))

    def base_pictures(self, run_dir: Path) -> BasePictures:
        """The base's own picture of each image's caption without the trigger and of the empty caption (seed: the
        image's index), at the image's bucket, drawn with generation's defaults (GenerateConfig: 25 steps, guidance
        7.5, whatever the base recommends), then encoded by the VAE as the training images are. Drawn once per run
        (a resumed run reads the latents back), shown as PNGs in the run's isolation_images/."""
        from sdlora.generate import render_many
        folder = runs.isolation_images_dir(run_dir)
        shapes = [tuple(lat.shape[1:]) for lat in self.examples.latents]
        expected = {f"{kind}.{i}": shape for kind in ("captioned", "empty") for i, shape in enumerate(shapes)}
        names = list(expected)
        kept = runs.load_latents(folder / "latents.safetensors")
        if kept is not None and {name: tuple(x.shape) for name, x in kept.items()} == expected:
            lat = [kept[name] for name in names]
        else:
            variants = len(self.captions) // len(shapes)
            prompts = [dataset.without_trigger(self.captions[i * variants], self.data.trigger)
                       for i in range(len(shapes))]
            cfgs = [GenerateConfig(prompt=prompt, seed=i, width=fit.bucket[0], height=fit.bucket[1])
                    for captions in (prompts, [""] * len(prompts))
                    for i, (prompt, fit) in enumerate(zip(captions, self.plan.fits))]
            drawn = render_many(self.pipeline(), cfgs, self.plan.resolution, output_type="latent")
            images = [self.batches.decode_latents(x[None].float())[0] for x in drawn]        # (3, H, W) in 0..1
            lat = [self.batches.encode_pixels(image[None] * 2 - 1)[0] for image in images]
            if self.main:
                folder.mkdir(parents=True, exist_ok=True)
                for name, image in zip(names, images):
                    kind, i = name.split(".")
                    runs.write_png(folder / f"{int(i):04d}-{kind}.png", Image.fromarray(
                        (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()))
                runs.save_latents(folder / "latents.safetensors", dict(zip(names, lat)))
                self.cb.on_message(f"pass isolation: drew the base's picture of each caption without the trigger "
                                   f"and of the empty caption ({len(lat)} images, {cfgs[0].steps} steps, guidance "
                                   f"{cfgs[0].guidance:g}) in {folder}")
        n = len(shapes)
        return BasePictures([x.to(self.acc.device) for x in lat[:n]], [x.to(self.acc.device) for x in lat[n:]])

    def render(self, prompt: str, seed: int):
        """An image from the base as it is now (with the LoRA once it trains), by generation's own path."""
        from sdlora.generate import render
        return render(self.pipeline(), GenerateConfig(prompt=prompt, seed=seed), self.plan.resolution)

    def pipeline(self):
        """The generation pipeline of the base as it is now (its U-Net is the one training, adapters in place)."""
        from sdlora.generate import make_pipeline
        if self._pipe is None:
            self._pipe = make_pipeline(self.base)
        return self._pipe

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, run_dir: Path, start: int) -> TrainResult:
        total, cfg = self.plan.steps, self.cfg
        t0, done, loss_value, last_ckpt = time.time(), 0, float("nan"), runs.latest_checkpoint(run_dir)
        log = runs.open_log(run_dir, start) if self.main else None
        if cfg.sample_every and start == 0:
            self.samples(run_dir, 0)              # the base's own images (B = 0): what each sample is compared with
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
                lat, enc, idx = self.batches.draw(g, self.examples)
                if self.cfg.caption_dropout:
                    enc = self.untriggered.drop_captions(g, enc, self.cfg.caption_dropout)
                if self.kv_isolation is not None:
                    loss = self.objective.loss(self.unet, self.bare_unet, lat, enc, g)
                else:       # pass isolation every isolation_every steps, weighted as often
                    every = self.cfg.isolation_every
                    plain = (lambda: self.untriggered.pick(g, idx, self.pictures)) if step % every == 0 else None
                    loss = self.objective.loss(self.unet, self.bare_unet, lat, enc, g, plain,
                                               self.cfg.trigger_isolation * every)
                if self.prior is not None:
                    plat, penc, _ = self.batches.draw(g, self.prior)
                    loss = loss + self.cfg.prior_loss_weight * self.objective.loss(self.unet, self.bare_unet,
                                                                                   plat, penc, g)
                value = float(loss.detach())
                if not math.isfinite(value):
                    return value
                if self.adalora is not None:
                    loss = loss + self.adalora.penalty()
                if self.kv_isolation is not None:
                    loss = loss + TEXT_ISOLATION_SCALE * self.cfg.trigger_isolation * self.kv_isolation.penalty()
                self.acc.backward(loss)
                self.opt.step()
                self.lr_sched.step() if self.acc.sync_gradients else None
                if self.adalora is not None and self.acc.sync_gradients:
                    self.adalora.after_step(step)         # reads the gradients: before they are zeroed
                self.opt.zero_grad(set_to_none=True)
            total_loss += value / self.cfg.grad_accum
        return total_loss

    def step_generator(self, step: int, micro: int) -> torch.Generator:
        world, rank = self.acc.num_processes, self.acc.process_index
        seed = (self.cfg.seed * 1_000_003 + (step * self.cfg.grad_accum + micro) * world + rank) % 2**63
        torch.manual_seed(seed)                           # dropout inside the LoRA layers
        return torch.Generator().manual_seed(seed)

    def checkpoint(self, run_dir: Path, step: int) -> Path | None:
        self.acc.wait_for_everyone()
        if not self.main:
            return None
        tensors = {"unet." + k: v for k, v in adapters.adapter_state(self.bare_unet).items()}
        if self.spec.text_encoder:
            for component, te in self.base.text_encoders.items():
                tensors.update({f"{component}.{k}": v for k, v in adapters.adapter_state(te).items()})
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.lr_sched.state_dict(), "step": step}
        if self.adalora is not None:
            state["adalora"] = self.adalora.state()
        path = runs.save_checkpoint(run_dir, step, tensors, state)
        self.cb.on_checkpoint(step, path)
        return path

    def samples(self, run_dir: Path, step: int) -> None:
        if not self.main:
            return
        self.bare_unet.eval()
        paths = []
        for i, prompt in enumerate(self.sample_prompts()):
            for seed in self.cfg.sample_seeds:
                path = runs.sample_path(run_dir, step, seed, i)
                path.parent.mkdir(exist_ok=True)
                runs.write_png(path, self.render(prompt, seed))
                paths.append(path)
        self.bare_unet.train()
        self.cb.on_sample(step, paths)

    def sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            return list(self.cfg.sample_prompts)
        first = self.plan.items[0].caption
        return [first, captioning.without_trigger(first, self.data.trigger)]

    def export(self, run_dir: Path) -> Path:
        """The trained adapters as a LoRA file with its sidecars (main process only)."""
        from sdlora.training.export import describe_export, export_lora
        loras = adapters.extract(self.bare_unet, "unet", self.spec)
        if self.spec.text_encoder:
            for component, te in self.base.text_encoders.items():
                loras.update(adapters.extract(te, component, self.spec))
        self.bare_unet.eval()
        found = self.calibration()
        scale = found.strength if found else 1.0
        for w in loras.values():
            w.up = w.up * scale
        seeds = self.cfg.sample_seeds or (0,)
        with self.lora_strength(scale):                               # the file's strength 1, the trigger caption
            preview = self.render(self.plan.items[0].caption, seeds[0])
        path, report = export_lora(run_dir, loras, self.base, self.module_sets, preview,
                                   {"sdlora_strength_scale": f"{scale:g}"} if found else None)
        self.cb.on_message(describe_export(report))
        return path

    @contextlib.contextmanager
    def lora_strength(self, strength: float):
        """The trained adapters drawn at `strength` (their scale x strength) inside the block."""
        from peft.tuners.lora import LoraLayer
        layers = [m for model in (self.bare_unet, *self.base.text_encoders.values()) for m in model.modules()
                  if isinstance(m, LoraLayer)]
        for layer in layers:
            layer.set_scale(adapters.ADAPTER, strength)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_scale(adapters.ADAPTER, 1.0)

    def calibration(self) -> calibrate.Calibration | None:
        """The strength whose samples come closest to the training images (training.calibrate), or None when
        calibration is off or cannot scale this adapter."""
        if not self.cfg.calibrate_strength:
            return None
        if self.spec.adapter != "lora" or self.spec.use_dora:
            self.cb.on_message("strength calibration: skipped (it scales plain LoRA files; DoRA and AdaLoRA files "
                               "keep strength 1 as trained)")
            return None
        from sdlora.generate import render_many
        pipe = self.pipeline()
        steps, guidance = self.base.sampling or calibrate.SAMPLING
        bucket = {it.caption: fit.bucket for it, fit in zip(self.plan.items, self.plan.fits)}   # (w, h) as trained

        def draw(requests: list[tuple[str, int]], strength: float) -> list[torch.Tensor]:
            """Each (caption, seed) at its trained size, the captions of one size drawn in batches."""
            cfgs = [GenerateConfig(prompt=caption, seed=seed, steps=steps, guidance=guidance, width=bucket[caption][0],
                                   height=bucket[caption][1]) for caption, seed in requests]
            with self.lora_strength(strength):
                drawn = render_many(pipe, cfgs, self.plan.resolution, output_type="pt")
            return [image[None].float().cpu() for image in drawn]

        n = min(calibrate.N_CAPTIONS, len(self.plan.items))           # each image unflipped, as trained
        targets = [self.batches.decode_latents(lat[:1])[0].cpu() for lat in self.examples.latents[:n]]
        found = calibrate.calibrate(draw, [it.caption for it in self.plan.items], targets, (steps, guidance),
                                    self.cfg.seed)
        self.cb.on_message(found.describe())
        return found


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
        try:
            data, spec, cfg = runs.read_run_config(run_dir)
        except runs.RunError as e:
            raise TrainingError(str(e)) from None
        resume_from = runs.latest_checkpoint(run_dir)
        if resume_from is None:
            raise TrainingError(f"{run_dir} has no checkpoint to resume from; start a new run instead")
    t = _Trainer(data, spec or LoraSpec(), cfg or TrainConfig(), cb, cancel, base)
    if resume is None:
        run_dir = _shared_run_dir(t, t.cfg.output_dir, runs.safe_name(t.cfg.run_name or data.trigger))
        if t.main:
            runs.write_json(run_dir / "config.json", runs.run_config(data, t.spec, t.cfg, t.plan, t.acc.num_processes))
    if t.main:
        cb.on_run(run_dir)
        cb.on_plan(t.plan)
        if resume is None:
            cb.on_message(f"run folder {run_dir}")
        cb.on_message(f"learning rate {t.cfg.lr:g} ({t.lr_source}); steps {t.cfg.steps} ({t.steps_source}); "
                      f"rank {t.spec.rank}, alpha {t.spec.alpha:g}")
        targets = {"kv": "cross-attention keys and values", "qkvo": "cross-attention q, k, v and out"}
        method = isolation_method(t.spec, t.cfg)
        how = method
        if method == "pass":
            held = "the base's own pictures" if t.cfg.isolation_images == "base" else "the training images"
            every = f"every {t.cfg.isolation_every} steps" if t.cfg.isolation_every > 1 else "every step"
            how = f"a second pass {every}, on {held}"
        isolation = (f"trigger isolation {t.cfg.trigger_isolation:g}, {how}"
                     if t.cfg.trigger_isolation else "no trigger isolation")
        cb.on_message(f"adapting {targets[t.spec.cross_attention]}"
                      f"{' and self-attention' if t.spec.self_attention else ''}; {isolation}")
    try:
        start = t.setup(run_dir, resume_from)
        if t.main and resume_from is not None:
            cb.on_message(f"resuming {run_dir} at step {start} of {t.plan.steps}")
        try:
            result = t.run(run_dir, start)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not hardware.is_out_of_memory(e):
                raise
            raise TrainingError(hardware.out_of_memory_advice(t.cfg, t.plan.resolution, run_dir)) from e
        if not result.cancelled and t.main:
            result.lora_path = t.export(run_dir)
        t.acc.wait_for_everyone()
        return result
    finally:
        if base is not None:            # a caller's base goes back as it came
            for model in (base.unet, *base.text_encoders.values()):
                adapters.remove_adapters(model)
        t.acc.end_training()


def _shared_run_dir(t: _Trainer, output_dir: str, name: str) -> Path:
    """The main process creates the run folder; the others learn its name."""
    from accelerate.utils import broadcast_object_list
    holder = [str(runs.new_run_dir(output_dir, name))] if t.main else [None]
    if t.acc.num_processes > 1:
        broadcast_object_list(holder)
    return Path(holder[0])


__all__ = ["train", "plan", "Plan", "Callbacks", "StepInfo", "TrainResult", "TrainingError"]
