"""Will a run fit in this machine's memory? Answered before minutes of work (issue 19, goal 6).

``model_size`` reads a model's parameter count and vocabulary without loading its weights (a
config in code, a Hugging Face ``config.json`` on the meta device, a GGUF's header);
``estimate_peak_bytes`` turns them and the run's shapes into the peak memory of the whole process
tree of ``fedquant simulate`` (server, Ray, client actors); ``check_fits`` refuses a run whose
estimate passes the machine's memory, with the estimate and the reason.

The coefficients are measured, not derived: ``bench/large_models.py`` on Qwen2.5 0.5B and
DeepSeek-R1-Distill-Qwen-1.5B of real sizes (random weights; ``bench/results/large_models.json``,
README "Large models"). They are float32 bytes of weights (``4 * params``) per process role,
plus the logits of a batch, plus a fixed base (Python, torch, ONNX Runtime and Ray's processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GB = 1e9

# Peak of the process tree = BASE + weight bytes x (PREPARE or RUN) + logits bytes x LOGITS, the
# larger of preparation and run. Fitted on bench/results/large_models.json (configs/large.toml:
# one profile, one client actor at a time, no learned-range round), weights W = 4 x parameters:
# - Qwen2.5-0.5B (W 1.98 GB), complete: preparation peaked at 7.6 GB (the export), the run at
#   13.7 GB during the evaluation round (server 7.9 GB, its evaluation runtime being patched;
#   the client actor 5.4 GB): PREPARE 2.8, SERVER 3.0, ACTOR 2.75 (per W, over BASE).
# - DeepSeek-R1-Distill-Qwen-1.5B (W 7.1 GB): preparation peaked at 16.6 GB (2.1 W + BASE: the
#   estimate says 21.9, on the safe side); the run was killed by the bench past 21.0 GB in its
#   evaluation round (the actor alone 16.3 GB): the estimate, 43 GB, refuses it on this 25 GB
#   machine, which the measurement agrees with, though by how much is unmeasured.
# A config with several profiles per actor or learned-range (torch) rounds needs more: not fitted.
BASE_BYTES = 2.0 * GB          # interpreters, torch/ORT libraries, Ray's raylet/GCS/dashboard
PREPARE_WEIGHTS = 2.8          # torch model + the tidy float graph, then calibration and QDQ export
SERVER_WEIGHTS = 3.0           # server: evaluation runtime per profile while it is patched
ACTOR_WEIGHTS = 2.75           # per client actor: float capture session + integer runtime + patch
LOGITS_COPIES = 4.0            # logits of a batch: ORT output, log-softmax, gathers (not fitted)
RAY_KILL_FRACTION = 0.95       # Ray's memory monitor kills workers past this share of the machine


class ModelTooLarge(ValueError):
    """The run's estimated peak memory passes what the machine has; the message says by how much."""


@dataclass(frozen=True)
class ModelSize:
    name: str
    params: int          # unique parameters (a tied lm_head counted once)
    vocab: int
    hidden: int
    layers: int
    tied: bool

    @property
    def weight_bytes(self) -> int:
        return 4 * self.params    # float32: what preparation, the float graph and capture hold


def _count_config(name: str, config) -> ModelSize:
    """Parameters of a transformers config, counted on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return ModelSize(name, params, int(config.vocab_size), int(config.hidden_size),
                     int(config.num_hidden_layers), bool(getattr(config, "tie_word_embeddings", False)))


def _gguf_size(path: Path) -> ModelSize:
    """From a GGUF's header and tensor table (memory-mapped, nothing dequantized)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(key, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else default

    params = sum(int(t.n_elements) for t in r.tensors)
    embed = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    vocab = field("vocab_size") or (int(max(embed.shape)) if embed is not None else 0)
    return ModelSize(str(path), params, vocab, field("embedding_length", 0), field("block_count", 0),
                     all(t.name != "output.weight" for t in r.tensors))


def model_size(name: str) -> ModelSize:
    """The size of model ``name`` (as ``simulation.models.load_model`` takes it), without its weights."""
    from simulation import models

    if name == "smollm2":
        return ModelSize(name, models.SMOLLM2_PARAMS, 49152, 576, 30, True)
    if name in models.QWEN2_CONFIGS:
        c = models.QWEN2_CONFIGS[name]
        return ModelSize(name, models.parameter_count(name), c["vocab_size"], c["hidden_size"],
                         c["num_hidden_layers"], c["tie_word_embeddings"])
    if name in ("tiny-llama", "tiny-qwen2"):
        m = models.tiny_llama() if name == "tiny-llama" else models.tiny_qwen2()
        return _count_config(name, m.config)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_size(path)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        return _count_config(name, AutoConfig.from_pretrained(path, local_files_only=True))
    raise FileNotFoundError(f"no model {name!r} to size (see simulation.models.load_model)")


def estimate_peak_bytes(size: ModelSize, *, batch: int, seq_len: int, client_actors: int) -> dict:
    """``{"peak", "prepare", "run", "logits_batch"}`` in bytes: the peak of the process tree of a
    simulation of ``size`` with evaluation/statistics batches of ``batch`` x ``seq_len`` tokens and
    ``client_actors`` Ray actors at once (module docstring for the coefficients)."""
    w = size.weight_bytes
    logits = 4 * batch * seq_len * size.vocab
    prepare = BASE_BYTES + PREPARE_WEIGHTS * w + LOGITS_COPIES * logits
    run = BASE_BYTES + (SERVER_WEIGHTS + ACTOR_WEIGHTS * client_actors) * w + LOGITS_COPIES * logits
    return {"peak": int(max(prepare, run)), "prepare": int(prepare), "run": int(run), "logits_batch": int(logits)}


def machine_memory() -> int:
    """Total memory of this machine, bytes (``/proc/meminfo``'s MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(size: ModelSize, *, batch: int, seq_len: int, client_actors: int,
               memory: int | None = None) -> dict:
    """The estimate (``estimate_peak_bytes``), or ModelTooLarge when it passes
    ``RAY_KILL_FRACTION`` of ``memory`` (default: this machine's), saying what would need to change."""
    memory = machine_memory() if memory is None else memory
    est = estimate_peak_bytes(size, batch=batch, seq_len=seq_len, client_actors=client_actors)
    limit = RAY_KILL_FRACTION * memory
    if est["peak"] > limit:
        stage = "preparation" if est["prepare"] >= est["run"] else "the run"
        raise ModelTooLarge(
            f"{size.name}: {size.params / 1e9:.2f}B parameters ({size.weight_bytes / GB:.1f} GB in float32, "
            f"vocabulary {size.vocab}) need about {est['peak'] / GB:.1f} GB at the peak of {stage} "
            f"(preparation {est['prepare'] / GB:.1f} GB, run {est['run'] / GB:.1f} GB with {client_actors} "
            f"client actor(s); logits of a batch {est['logits_batch'] / GB:.2f} GB); this machine has "
            f"{memory / GB:.1f} GB and Ray kills workers past {RAY_KILL_FRACTION:.0%} ({limit / GB:.1f} GB). "
            f"Use a smaller model, fewer client actors at once (engine.client_cpus) or a smaller "
            f"server.batch_size / data.seq_len.")
    return est
