"""Will a run fit in this machine's memory? Answered before minutes of work (issue 19, goal 6).

``model_size`` reads a model's parameter count and vocabulary without loading its weights (a
config in code, a Hugging Face ``config.json`` on the meta device, a GGUF's header);
``estimate_peak_bytes`` turns them and the run's shapes into the peak memory of the whole process
tree of ``fedquant simulate`` (server, Ray, client actors); ``check_fits`` refuses a run whose
estimate passes the machine's memory, with the estimate and the reason.

The coefficients are measured, not derived: ``bench/large_models.py`` on Qwen2.5 0.5B and
DeepSeek-R1-Distill-Qwen-1.5B of real sizes (random weights) and on SmolLM2 with the default's
jobs (``bench/results/large_models.json``, README "Large models"). They are float32 bytes of weights (``4 * params``) per process role,
plus the logits of a batch, plus a fixed base (Python, torch, ONNX Runtime and Ray's processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GB = 1e9

# Peak of the process tree: preparation BASE + PREPARE x W, the run RUN_BASE + (SERVER + ACTOR x
# actors) x W, each + LOGITS x the logits of a batch; the larger of the two. W = 4 x parameters
# (float32 weights). Fitted on bench/results/large_models.json, after issue 19's runtime cuts (an
# actor holds only its current job's models, the float graph mapped from one file, a patch one
# Linear at a time):
# - Qwen2.5-0.5B (W 1.98 GB) and DeepSeek-R1-Distill-Qwen-1.5B (W 7.1 GB), configs/large.toml (one
#   profile, one client actor at a time, no torch job): the runs peaked at 8.3 and 16.1 GB in the
#   evaluation round (on 0.5B the server 5.8 GB, evaluating, the actor 2.1 GB), a line through
#   both: RUN_BASE 4.6 GB + 1.7 W, split as on 0.5B between SERVER and ACTOR. Preparation peaked at
#   6.7 and 16.7 GB (the estimate 7.8 and 22.2, on the safe side).
# - SmolLM2 (W 0.54 GB), the default run (two profiles, two actors, plan and torch learned-range
#   jobs): since the actors' torch jobs take turns (client.app.torch_turn), one at a time, the run
#   peaked at 6.45 GB (bench/results/large_models_default.json; 10.7 GB when every actor ran one at
#   once, ACTOR_TORCH was then 5 W per actor), the actor in its torch job at 2.7-3.7 GB;
#   configs/memory.toml at 6.93 GB (bench/results/large_models_memory.json), in an evaluation round.
#   One actor's torch job adds ACTOR_TORCH 1.5 W over the others', enough for the estimate (7.05 GB)
#   to cover both. Fitted on this one small model, where the libraries' fixed cost is most of it:
#   not checked on a larger model.
BASE_BYTES = 2.0 * GB          # interpreters, torch/ORT libraries
PREPARE_WEIGHTS = 2.8          # torch model + the tidy float graph, then calibration and QDQ export
RUN_BASE_BYTES = 4.6 * GB      # the server, Ray's raylet/GCS and the actors' interpreters and arenas
SERVER_WEIGHTS = 1.2           # server: float session + the evaluation runtime being patched
ACTOR_WEIGHTS = 0.55           # per client actor: the integer runtime being patched, or the capture
ACTOR_TORCH_WEIGHTS = 1.5      # once: the one actor in a torch job (plan, torch lsq): model, FIT/LSQ state
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


def estimate_peak_bytes(size: ModelSize, *, batch: int, seq_len: int, client_actors: int,
                        torch_jobs: bool = False) -> dict:
    """``{"peak", "prepare", "run", "logits_batch"}`` in bytes: the peak of the process tree of a
    simulation of ``size`` with evaluation/statistics batches of ``batch`` x ``seq_len`` tokens and
    ``client_actors`` Ray actors at once, ``torch_jobs`` when its schedule has plan or torch
    learned-range rounds (module docstring for the coefficients)."""
    w = size.weight_bytes
    logits = 4 * batch * seq_len * size.vocab
    torch_job = ACTOR_TORCH_WEIGHTS if torch_jobs else 0.0      # one at a time: client.app.torch_turn
    prepare = BASE_BYTES + PREPARE_WEIGHTS * w + LOGITS_COPIES * logits
    run = RUN_BASE_BYTES + (SERVER_WEIGHTS + ACTOR_WEIGHTS * client_actors + torch_job) * w + LOGITS_COPIES * logits
    return {"peak": int(max(prepare, run)), "prepare": int(prepare), "run": int(run), "logits_batch": int(logits)}


def machine_memory() -> int:
    """Total memory of this machine, bytes (``/proc/meminfo``'s MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(size: ModelSize, *, batch: int, seq_len: int, client_actors: int,
               memory: int | None = None, torch_jobs: bool = False) -> dict:
    """The estimate (``estimate_peak_bytes``), or ModelTooLarge when it passes
    ``RAY_KILL_FRACTION`` of ``memory`` (default: this machine's), saying what would need to change."""
    memory = machine_memory() if memory is None else memory
    est = estimate_peak_bytes(size, batch=batch, seq_len=seq_len, client_actors=client_actors,
                              torch_jobs=torch_jobs)
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
