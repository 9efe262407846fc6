"""The Generate tab: a base loaded once, LoRAs at chosen strengths, a strength sweep; and its page.

Moving a strength slider never reloads the base model (the Generator is kept per base).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sdlora.bases.precision import PRECISIONS
from sdlora.config import ConfigError, GenerateConfig
from sdlora.data.captions import has_trigger
from sdlora.runs import lora_files
from sdlora.webui.forms import TEMPLATES, UserError, safe_filename, whole, within
from sdlora.webui.library_tab import lora_info

MAX_LORA_BYTES = 1024 * 2**20   # an uploaded LoRA file (SD 1.x LoRAs are 10-300 MB)
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


class GenerateMixin:
    """The WebUI's generation handlers (state: self._gen, self._gen_name, self.base_loads, self.uploaded_loras)."""

    def generator(self, base: str, precision: str = "fp32"):
        """The Generator for `base` at `precision`, loaded once and kept; another base or precision replaces it."""
        from sdlora.generate import Generator
        base = (base or self.base).strip()
        with self._gen_lock:
            if self._gen is None or self._gen_name != base or self._gen_precision != precision:
                self._gen = None
                try:
                    self._gen = Generator(base, precision=precision or "fp32")
                except ValueError as e:     # BaseModelError, or a precision this machine cannot do (no bitsandbytes)
                    raise UserError(str(e)) from None
                self._gen_name, self._gen_precision, self.base_loads = base, precision, self.base_loads + 1
            return self._gen

    def lora_choices(self) -> list[tuple[str, str]]:
        found = [(str(p.relative_to(self.outputs)), str(p)) for p in lora_files(self.outputs)]
        return found + [(f"uploaded: {p.name}", str(p)) for p in self.uploaded_loras if p.is_file()]

    def add_lora_upload(self, path: str) -> str:
        """Accept an uploaded external LoRA (it stays in the temporary upload folder)."""
        from sdlora.loras.layouts import LoraFileError, read_lora_file
        p = Path(path or "")
        if p.suffix.lower() != ".safetensors":
            raise UserError(f"{safe_filename(p.name)}: only .safetensors LoRA files can be uploaded "
                            "(pickle files can run code when opened).")
        if p.stat().st_size > MAX_LORA_BYTES:
            raise UserError(f"{safe_filename(p.name)} is over the {MAX_LORA_BYTES // 2**20} MB limit for a LoRA file.")
        try:
            read_lora_file(p)
        except LoraFileError as e:
            raise UserError(str(e)) from None
        self.uploaded_loras.append(p.resolve())
        return str(p.resolve())

    def _choices(self, slots) -> list:
        from sdlora.generate import LoraChoice
        out = []
        for path, strength, separate, te in slots:
            if not path:
                continue
            if not (within(path, self.outputs) or (self.upload_dir and within(path, self.upload_dir))):
                raise UserError(f"{Path(path).name}: only LoRA files under outputs/ or uploaded here can be used.")
            out.append(LoraChoice(str(path), float(strength), float(te) if separate else None))
        return out

    def generate(self, base: str, slots, gen: dict, precision: str = "fp32"):
        """One image; moving a strength never reloads the base (the Generator is kept)."""
        from sdlora.loras.layouts import LoraFileError
        cfg, choices = self._gen_config(gen), self._choices(slots)
        g = self.generator(base, precision)
        try:
            image = g.generate(cfg, choices)
        except (LoraFileError, ValueError) as e:
            raise UserError(str(e)) from None
        used = ", ".join(f"{Path(c.path).stem} at {c.strength:g}" for c in choices) or "no LoRA"
        where = "" if precision in ("fp32", None, "") else f" at {precision}"
        return image, f"Base '{self._gen_name}'{where} (loaded once), {used}, seed {cfg.seed}."

    def sweep(self, base: str, slots, gen: dict, precision: str = "fp32") -> list[tuple]:
        """The first LoRA at strengths 0 to 1 with the same seed: one row of images."""
        from sdlora.loras.layouts import LoraFileError
        cfg, choices = self._gen_config(gen), self._choices(slots)
        if not choices:
            raise UserError("Pick a LoRA first: the sweep shows it at strengths 0, 0.25, 0.5, 0.75 and 1.")
        try:
            images = self.generator(base, precision).sweep(cfg, choices[0], SWEEP)
        except (LoraFileError, ValueError) as e:
            raise UserError(str(e)) from None
        return [(im, f"{s:g}") for im, s in zip(images, SWEEP)]

    @staticmethod
    def _gen_config(gen: dict) -> GenerateConfig:
        g = {k: whole(v) for k, v in gen.items()}
        try:
            return GenerateConfig(prompt=g["prompt"] or "", negative_prompt=g["negative_prompt"] or "",
                                  seed=g["seed"] or 0, steps=g["steps"], guidance=float(g["guidance"]),
                                  width=g["width"] or None, height=g["height"] or None)
        except (ConfigError, TypeError) as e:
            raise UserError(str(e)) from None

    def prompt_for(self, path: str, prompt: str) -> str:
        """The prompt with the LoRA's trigger word in it (pre-filled when a LoRA is picked)."""
        trigger = lora_info(Path(path)).get("trigger", "") if path else ""
        prompt = (prompt or "").strip()
        if not trigger or has_trigger(prompt, trigger):
            return prompt
        return f"{trigger}, {prompt}" if prompt else TEMPLATES["style"].format(trigger=trigger)



# ---- the page ---------------------------------------------------------------------------------------------

SLOTS = 3                      # LoRAs that can be mixed


def layout(ui):
    """The Generate tab's controls: a base, up to three LoRAs with strengths, a prompt, seed and size."""
    import gradio as gr

    from sdlora.bases.load import native_resolution
    from sdlora.webui.widgets import base_picker
    g = SimpleNamespace(slots=[])
    gr.Markdown("Pick a LoRA (train one in **Train**, or upload a `.safetensors`), check the prompt, press "
                "**Generate**. Moving a strength slider never reloads the base model.")
    with gr.Row():
        g.base = base_picker(ui, ui.base, "g-base")
        g.base.scale = 3
        g.precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Base precision", scale=1,
                                  info="int8 / nf4 quantise the base with bitsandbytes (less memory)",
                                  elem_id="g-precision")
    for i in range(SLOTS):
        with gr.Accordion(f"LoRA {i + 1}", open=i == 0):
            with gr.Row():
                path = gr.Dropdown([], label="LoRA file (from outputs/ or uploaded)", scale=3,
                                   allow_custom_value=True, elem_id=f"lora{i + 1}")
                strength = gr.Slider(-1, 2, value=1.0, step=0.05, label="Strength", scale=2, elem_id=f"strength{i + 1}")
            with gr.Accordion("Advanced: separate U-Net and text-encoder strengths", open=False):
                with gr.Row():
                    separate = gr.Checkbox(False, label="Use a separate text-encoder strength")
                    te = gr.Slider(-1, 2, value=1.0, step=0.05, label="Text-encoder strength")
            if i == 0:
                g.upload = gr.UploadButton("Upload a .safetensors LoRA from elsewhere", file_types=[".safetensors"],
                                           size="sm")
        g.slots.append((path, strength, separate, te))
        if i == 0:
            gr.Markdown("**Mix LoRAs:** open *LoRA 2* and *LoRA 3* below and pick a file in each.")
    g.prompt = gr.Textbox("", label="Prompt", info="Filled with the LoRA's trigger word when you pick one",
                          elem_id="prompt")
    g.negative = gr.Textbox("", label="Negative prompt")
    size = native_resolution(ui.base)
    with gr.Row():
        g.G = {"seed": gr.Number(1, label="Seed", precision=0, minimum=0),
               "steps": gr.Number(20, label="Steps", precision=0, minimum=1),
               "guidance": gr.Number(7.5, label="Guidance"),
               "width": gr.Number(size, label="Width", precision=0, step=8),
               "height": gr.Number(size, label="Height", precision=0, step=8)}
    for key, comp in g.G.items():
        comp.elem_id = f"g-{key}"
    with gr.Row():
        g.gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        g.sweep_btn = gr.Button("Strength sweep (LoRA 1 at 0 to 1)", elem_id="sweep-btn")
    g.image = gr.Image(label="Result", interactive=False, height=320, elem_id="gen-image")
    g.info = gr.Markdown(elem_id="gen-info")
    g.sweep = gr.Gallery(label="Strength sweep: same prompt and seed, LoRA 1 at these strengths", columns=5, rows=1,
                         height=280, object_fit="contain", elem_id="sweep")
    return g


def open_in_generate(ui, path, text):
    """Switch to the Generate tab with `path` picked as LoRA 1 and its trigger in the prompt."""
    import gradio as gr
    return gr.Tabs(selected="generate"), gr.update(choices=ui.lora_choices(), value=path), ui.prompt_for(path, text)


def wire(ui, g, tabs) -> None:
    from sdlora.webui.widgets import guarded
    first = g.slots[0][0]
    first.change(ui.prompt_for, [first, g.prompt], g.prompt)
    g.upload.upload(guarded(lambda f, text: open_in_generate(ui, ui.add_lora_upload(f), text)[1:]),
                    [g.upload, g.prompt], [first, g.prompt])
    inputs = [g.base, g.precision, g.prompt, g.negative, *g.G.values(), *[c for slot in g.slots for c in slot]]

    def unpack(base, precision, pr, neg, *rest):
        gen = dict(zip(["prompt", "negative_prompt", *g.G], [pr, neg, *rest[:len(g.G)]]))
        vals = rest[len(g.G):]
        return base, [tuple(vals[i:i + 4]) for i in range(0, len(vals), 4)], gen, precision
    g.gen_btn.click(guarded(lambda *v: ui.generate(*unpack(*v))), inputs, [g.image, g.info])
    g.sweep_btn.click(guarded(lambda *v: ui.sweep(*unpack(*v))), inputs, g.sweep)
    tabs.select(lambda: lora_lists(ui, g), None, [s[0] for s in g.slots])

    def on_base(base):
        from sdlora.bases.load import native_resolution
        size = native_resolution((base or "").strip() or ui.base)
        return size, size
    g.base.change(on_base, g.base, [g.G["width"], g.G["height"]])


def lora_lists(ui, g) -> list:
    import gradio as gr
    choices = ui.lora_choices()
    return [gr.update(choices=choices) for _ in g.slots]


__all__ = ["GenerateMixin", "MAX_LORA_BYTES", "SWEEP", "layout", "wire", "open_in_generate", "lora_lists", "SLOTS"]
