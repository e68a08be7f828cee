"""Loading at size (issue 16): the target dtype directly, device maps, and a checkpoint-file fingerprint that is
the same however the checkpoint is loaded (tiny random models written by the test; no download)."""
from __future__ import annotations

import pytest
import torch

from biaslab.errors import BiaslabError, PatchMismatchError
from biaslab.launchers import RENDEZVOUS_VARS, SLURM_GPU_BIND_VARS, TORCH_VARS
from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = make_tiny_llama()
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _other_dir(tmp_path):
    model, tok = make_tiny_llama(seed=3)
    d = tmp_path / "other"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_fingerprint_comes_from_the_files_and_ignores_dtype_and_device_map(tiny_dir, tmp_path, monkeypatch):
    from biaslab.models import load_model
    from biaslab.patches import NeuronMaskPatch
    from biaslab.models.sites import find_sites

    monkeypatch.setenv("BIASLAB_CACHE", str(tmp_path / "cache"))
    a = load_model(str(tiny_dir))
    b = load_model(str(tiny_dir), dtype="bfloat16")
    c = load_model(str(tiny_dir), device_map="auto")
    assert a.fingerprint.startswith("sha256-files:") and a.fingerprint == b.fingerprint == c.fingerprint
    assert a.describe()["fingerprint_kind"] == "checkpoint files"
    assert b.dtype == torch.bfloat16 and c.device_map                      # loaded in bf16 directly; a map on CPU
    assert (tmp_path / "cache" / "fingerprints.json").is_file()            # file hashes cached by path+size+mtime
    s = find_sites(a.model, "ffn")
    p = NeuronMaskPatch.from_units(a, {s[0].name: [1, 2]}, sites="ffn")
    with p.applied(b):                                                     # same checkpoint, another dtype: accepted
        pass
    other = load_model(str(_other_dir(tmp_path)))
    with pytest.raises(PatchMismatchError):                                # another checkpoint: refused
        with p.applied(other):
            pass


def test_a_run_in_another_dtype_is_another_run(tiny_dir, tmp_path, monkeypatch):
    """The fingerprint is the same in every dtype (patches apply to any load), but the numbers are not: a float32
    rerun into a bf16 run's directory is refused (it resumed the bf16 records before), and the soft-prompt cache
    keys a bf16 prompt apart. float32 adds nothing to the identity, so the float32 runs made before still resume."""
    from biaslab import audit
    from biaslab.errors import RunConflictError
    from biaslab.models import load_model
    from biaslab.probes.softprompt import SoftPromptConfig

    monkeypatch.setenv("BIASLAB_CACHE", str(tmp_path / "cache"))
    f32, b16 = load_model(str(tiny_dir)), load_model(str(tiny_dir), dtype="bfloat16")
    assert f32.identity() == {"fingerprint": f32.fingerprint}
    assert b16.identity() == {"fingerprint": f32.fingerprint, "dtype": "bfloat16"}
    run = dict(benchmarks="crows", limit=8, n_boot=20, out=tmp_path / "run")
    audit(b16, **run)
    with pytest.raises(RunConflictError, match="differs in: .*dtype.*run in bfloat16: pass --dtype bfloat16 to resume"):
        audit(f32, **run)
    assert audit(b16, **run).results["benchmarks"]["crows"]["metrics"]               # the same dtype resumes
    cfg = SoftPromptConfig()
    assert cfg.key(f32.fingerprint, "d") != cfg.key(f32.fingerprint, "d", dtype="bfloat16")


def test_device_map_auto_on_cpu_scores_like_a_plain_load(tiny_dir):
    from biaslab.models import load_model

    plain, mapped = load_model(str(tiny_dir)), load_model(str(tiny_dir), device_map="auto")
    reqs = [("The nurse said", " that she was tired."), ("A", " b c d")]
    got = [r.logprob for r in mapped.loglikelihood(reqs)]
    want = [r.logprob for r in plain.loglikelihood(reqs)]
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("dm, mm, match", [
    ("everywhere", None, "device map 'everywhere'"),
    ("{not json", None, "not valid JSON"),
    (None, "0=1GiB", "--max-memory limits a --device-map"),
    ("auto", "0:1GiB", "DEVICE=SIZE pairs"),
    # Accelerate's own errors here were tracebacks from inside it (a bad size) or torch's CUDA assertion (a GPU
    # named on a machine without one)
    ("auto", "0=lots", r"--max-memory 0=lots: 'lots' is not a size; give one such as 70GiB"),
    ("auto", "cpu=0", "a device needs more than 0 bytes"),
    ("auto", "gpu=3GiB", r"unknown device 'gpu'; expected a GPU number \(0, 1, …\), cpu or mps"),
    ("auto", "disk=1TiB", "never offloads weights to disk"),
    ("auto", "cuda:0=1GiB,cpu=1GiB", "--max-memory names GPU 0, but this machine has no CUDA device"),
    ('{"model": "cuda:0", "lm_head": "cpu"}', None, "module 'model' → GPU 0, but this machine has no CUDA device"),
    ('{"model": 7}', None, "module 'model' → GPU 7, but"),
    ('{"model": "disk"}', None, "module 'model' → disk: biaslab never offloads"),
    ('{"model": "gpu"}', None, r"module 'model' → 'gpu': expected a GPU number"),
    # checked on the meta-device model before the weights load: a misspelt module, a module left out
    ('{"model.layer.0": "cpu", "": "cpu"}', None, r"names 'model.layer.0', which this model does not have \(did you "
                                                   r"mean 'model.layers.0'\?\)"),
    ('{"lm_head": "cpu"}', None, r"places no device for 20 of the model's weights \(first: model.embed_tokens.weight\)"
                                 r": add their modules \(e.g. 'model.embed_tokens', 'model.layers', 'model.norm'\)"),
    # the tiny model's 20 tensors are 6.1 MiB in float32; 10 KB of host memory holds none of them
    ("auto", "cpu=10KB", r"does not fit with --device-map auto and --max-memory cpu=10KB: 6\.1 MiB of weights "
                         r"\(20 tensors, first model\.embed_tokens\.weight\) found no room on the devices \(they "
                         r"could hold: cpu 9\.8 KiB\) and would have gone to disk"),
])
def test_bad_device_maps_are_one_clear_line(tiny_dir, dm, mm, match, monkeypatch):
    from biaslab.models import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same lines on a machine with GPUs

    with pytest.raises(BiaslabError, match=match):
        load_model(str(tiny_dir), device_map=dm, max_memory=mm)


def test_does_not_fit_says_it_once(tiny_dir, monkeypatch, caplog):
    """Accelerate's "offloaded to the disk" warning is not printed before biaslab's own "does not fit" line."""
    import logging

    from biaslab.models import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING), pytest.raises(BiaslabError, match="would have gone to disk"):
        load_model(str(tiny_dir), device_map="auto", max_memory="cpu=10KB")
    assert not [r for r in caplog.records if "offloaded" in r.getMessage()]
    assert not logging.getLogger("accelerate.big_modeling").filters   # the filter is removed again


@pytest.mark.parametrize("n_gpus, ranks, want", [
    (8, 8, [[0], [1], [2], [3], [4], [5], [6], [7]]),
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (7, 2, [[0, 1, 2], [3, 4, 5]]),                    # the remainder (GPU 6) idles: every rank holds as many
    (4, 1, [[0, 1, 2, 3]]),
])
def test_each_rank_owns_its_block_of_the_node_gpus(n_gpus, ranks, want):
    from biaslab.distributed import gpu_share

    assert [gpu_share(n_gpus, r, ranks) for r in range(ranks)] == want


def test_more_ranks_than_gpus_or_a_bad_local_rank_is_one_line(monkeypatch):
    from biaslab import distributed as D

    with pytest.raises(BiaslabError, match="4 processes on this node but only 2 GPU"):
        D.gpu_share(2, 0, 4)
    with pytest.raises(BiaslabError, match="nccl backend needs GPUs and this node has none .* use gloo"):
        D.gpu_share(0, 0, 2)                          # BIASLAB_DIST_BACKEND=nccl on a CPU machine
    for bad in ("abc", "-5", "0", "inf"):
        monkeypatch.setenv("BIASLAB_DIST_TIMEOUT", bad)
        with pytest.raises(BiaslabError, match=f"BIASLAB_DIST_TIMEOUT must be a positive number of seconds, got '{bad}'"):
            D.timeout_s()
    monkeypatch.setenv("BIASLAB_DIST_TIMEOUT", "2.5")
    assert D.timeout_s() == 2.5


def test_a_bad_backend_or_timeout_variable_is_its_own_line_before_the_group_starts(monkeypatch):
    """They were reported as "torch.distributed could not start the … backend (AssertionError: Unknown backend
    type …)" — a failed start of the backend, with torch's words — where the variable is what to fix."""
    from biaslab import distributed as D

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BIASLAB_DIST_BACKEND", "mpi2")
    with pytest.raises(BiaslabError, match=r"^BIASLAB_DIST_BACKEND='mpi2': expected one of gloo, nccl, mpi"):
        D.init_from_env()
    monkeypatch.setenv("BIASLAB_DIST_BACKEND", "gloo")
    monkeypatch.setenv("BIASLAB_DIST_TIMEOUT", "abc")
    with pytest.raises(BiaslabError, match=r"^BIASLAB_DIST_TIMEOUT must be a positive number of seconds, got 'abc'$"):
        D.init_from_env()
    import torch.distributed as dist

    assert not dist.is_initialized()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(BiaslabError, match="LOCAL_RANK=3 is outside"):
        D.node_share(8)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.node_share(8) == [4, 5, 6, 7]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")                 # a launcher that sets no LOCAL_WORLD_SIZE: one GPU each
    assert D.node_share(8) == [1]


def _no_launcher(monkeypatch, extra=()):
    """No launcher variables; whatever an adopter writes into os.environ is undone after the test."""
    from biaslab import launchers

    for v in (*TORCH_VARS, *launchers.MPI_SIZE_VARS, *launchers.MPI_RANK_VARS, *launchers.SLURM_STEP_VARS,
              *SLURM_GPU_BIND_VARS, "SLURM_NTASKS", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", *extra):
        monkeypatch.setenv(v, "")
        monkeypatch.delenv(v)
    monkeypatch.setattr(launchers, "adopted", None)
    monkeypatch.setattr(launchers, "_before", {})
    return launchers


def _env(names=RENDEZVOUS_VARS):
    return {v: os.environ.get(v) for v in names}


def test_mpi_launched_processes_take_their_ranks_from_mpi(monkeypatch):
    """mpirun (accelerate launch's CPU multi-process path) sets MPI's variables, not torch's: they are adopted."""
    L = _no_launcher(monkeypatch)
    assert L.adopt_launcher_env() is None    # no launcher at all: one process
    for k, v in {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BiaslabError, match="4 MPI processes, 2 of them known to be on this node, and no MASTER_ADDR"):
        L.adopt_launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert L.adopt_launcher_env() == "mpi" and L.adopted == "mpi"
    assert _env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert L.adopt_launcher_env() is None    # torch's own variables, once set, win


def test_slurm_host_lists_and_task_counts():
    """Slurm's compressed lists, read as scontrol would expand them (first host only) and as srun writes counts."""
    from biaslab.launchers import first_host, job_port, tasks_per_node

    assert first_host("gpu[07-09,12],cpu1") == "gpu07"            # zero padding kept
    assert first_host("node[3,1]-ib") == "node3-ib"               # a suffix after the bracket
    assert first_host("a[1-2]b[3-4]") == "a1b3"
    assert first_host("login2") == "login2"
    with pytest.raises(ValueError):
        first_host("")
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        tasks_per_node("two")
    assert (job_port(1234567), job_port(None)) == (24567, 29500)


def test_srun_tasks_take_their_ranks_from_slurm(monkeypatch):
    """srun (one task per GPU, no torchrun) sets Slurm's step variables: adopted, with each task's node-local rank,
    the first host of the step as MASTER_ADDR and a port from the job id. A batch script's own shell (SLURM_NTASKS
    but no SLURM_STEP_*) stays one process; so does a one-task step."""
    L = _no_launcher(monkeypatch)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert L.adopt_launcher_env() is None                          # sbatch's shell: one process
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
            "SLURM_JOB_ID": "4242"}
    for k, v in {**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(k, v)
    assert L.adopt_launcher_env() is None                          # srun -n 1: one process
    for k, v in {**step, "SLURM_LOCALID": "9"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BiaslabError, match="srun started 16 tasks but its variables do not describe this one"):
        L.adopt_launcher_env()                                     # local id 9 of 8 tasks on its node
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("SLURM_NODEID", "3")                        # a step on two of a job's four nodes
    assert L.adopt_launcher_env() == "slurm"
    assert _env(TORCH_VARS) == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                                "MASTER_ADDR": "gpu07", "MASTER_PORT": "24242", "GROUP_WORLD_SIZE": "2"}
    from biaslab import distributed as D

    assert D.node_share(8) == [5]                                  # all 8 GPUs visible: one each, as under torchrun
    with pytest.raises(BiaslabError, match="8 processes on this node but only 1 GPU.*srun --gpus-per-task=1"):
        D.node_share(1)                                            # unbound tasks would share the GPU
    monkeypatch.setenv("SLURM_TRES_BIND", "gres/gpu:none")
    with pytest.raises(BiaslabError, match="only 2 GPU"):
        D.node_share(2)                                            # --gpu-bind=none: not bound
    monkeypatch.setenv("SLURM_TRES_BIND", "gres/gpu:per_task:2")     # what srun sets for --gpus-per-task=2
    assert D.node_share(2) == [0, 1]                               # srun bound two GPUs to each task: those it sees
    monkeypatch.delenv("SLURM_TRES_BIND")
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "2")                 # older Slurm
    assert D.node_share(2) == [0, 1]


def test_mpirun_inside_an_allocation_keeps_mpi_ranks(monkeypatch):
    """mpirun under Slurm starts its daemons with srun, whose step variables count daemons (one per node): MPI's
    ranks are taken. With srun --mpi=pmi2 both agree, and Slurm's node-local ranks are taken."""
    L = _no_launcher(monkeypatch)
    for k, v in {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NODELIST": "n[1-2]",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "OMPI_COMM_WORLD_SIZE": "16",
                 "OMPI_COMM_WORLD_RANK": "11", "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
                 "MASTER_ADDR": "n1"}.items():
        monkeypatch.setenv(k, v)
    assert L.adopt_launcher_env() == "mpi" and _env()["RANK"] == "11" and _env()["LOCAL_RANK"] == "3"
    L = _no_launcher(monkeypatch, extra=("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    for k, v in {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "n[1-2]",
                 "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "PMI_SIZE": "4",
                 "PMI_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    assert L.adopt_launcher_env() == "slurm"
    assert _env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


def test_a_device_map_under_several_ranks_stays_on_the_rank_own_gpus():
    """Rank 1 of 2 on an 8-GPU node owns GPUs 4-7: a strategy is capped to them (the user's per-GPU caps count
    within the share), host memory is split between the ranks, and a JSON map's GPU numbers are shifted."""
    from biaslab.models.placement import place_on_share

    free = {g: 1000 + g for g in range(8)}
    kw = dict(free_gpu=free.__getitem__, cpu_free=900, ranks_on_node=2)
    dm, mm = place_on_share("auto", None, [4, 5, 6, 7], **kw)
    assert dm == "auto" and mm == {4: 1004, 5: 1005, 6: 1006, 7: 1007, "cpu": 450}
    _, mm = place_on_share("balanced", {0: "70GiB", "cpu": "100GiB", "disk": "1TiB"}, [4, 5, 6, 7], **kw)
    assert mm == {4: "70GiB", 5: 1005, 6: 1006, 7: 1007, "cpu": "100GiB", "disk": "1TiB"}
    dm, _ = place_on_share({"model.embed": 0, "model.layers.0": "cuda:1", "lm_head": "cpu"}, None, [4, 5, 6, 7], **kw)
    assert dm == {"model.embed": 4, "model.layers.0": "cuda:5", "lm_head": "cpu"}
    with pytest.raises(BiaslabError, match="names GPU 4, but each process of this run owns 4 GPU"):
        place_on_share({"model": 4}, None, [4, 5, 6, 7], **kw)
    with pytest.raises(BiaslabError, match="--max-memory names GPU 5"):
        place_on_share("auto", {5: "1GiB"}, [4, 5, 6, 7], **kw)


def test_without_nccl_a_device_map_is_left_as_given():
    from biaslab.models.placement import placement_for_this_rank

    assert placement_for_this_rank("auto", {"cpu": "1GiB"}) == ("auto", {"cpu": "1GiB"})


def test_checkpoint_fingerprint_rehashes_only_a_changed_file(tmp_path):
    from biaslab.models.fingerprint import checkpoint_fingerprint

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"a" * 100)
    (d / "config.json").write_text("{}")
    cache = tmp_path / "fp.json"
    one = checkpoint_fingerprint(d, cache)
    assert checkpoint_fingerprint(d, cache) == one
    (d / "model.safetensors").write_bytes(b"b" * 100)                      # same size, new mtime, new content
    assert checkpoint_fingerprint(d, cache) != one
    with pytest.raises(BiaslabError, match="holds no weights file"):
        (tmp_path / "e").mkdir()
        checkpoint_fingerprint(tmp_path / "e")


def _shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for k, byte in enumerate(b"abc"):
        (d / f"model-0000{k + 1}-of-00003.safetensors").write_bytes(bytes([byte]) * (1000 + k))
    (d / "config.json").write_text('{"x": 1}')
    return d


def test_checkpoint_fingerprint_is_the_sha256_of_the_files_hashes(tmp_path):
    """The definition, recomputed by hand: sha256 over "name:sha256(file)\n" for the weights in name order, then
    config.json — whichever thread hashed which file."""
    import hashlib

    from biaslab.models.fingerprint import checkpoint_fingerprint

    d = _shards(tmp_path)
    lines = "".join(f"{f}:{hashlib.sha256((d / f).read_bytes()).hexdigest()}\n" for f in
                    ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "config.json"])
    assert checkpoint_fingerprint(d) == "sha256-files:" + hashlib.sha256(lines.encode()).hexdigest()


def test_the_fingerprint_covers_the_files_transformers_loads(tmp_path):
    """Shards named by model.safetensors.index.json (a Mistral-style consolidated.safetensors beside them is not
    part of the checkpoint: deleting it keeps the fingerprint), model.safetensors before other safetensors files;
    an index naming a missing shard, or not an index, is one line."""
    from biaslab.models.fingerprint import checkpoint_files, checkpoint_fingerprint

    d = _shards(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors", "d": "model-00001-of-00003.safetensors"}}))
    with_index = checkpoint_fingerprint(d)
    (d / "consolidated.safetensors").write_bytes(b"z" * 3000)
    assert [f.name for f in checkpoint_files(d)] == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                                     "model-00003-of-00003.safetensors", "config.json"]
    assert checkpoint_fingerprint(d) == with_index
    (d / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(BiaslabError, match="names the shard model-00003-of-00003.safetensors, which is not in"):
        checkpoint_fingerprint(d)
    (d / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(BiaslabError, match="not a weights index"):
        checkpoint_files(d)
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").write_bytes(b"m" * 10)
    (d / "adapter_model.safetensors").write_bytes(b"p" * 10)
    assert [f.name for f in checkpoint_files(d)] == ["model.safetensors", "config.json"]


def test_under_several_ranks_each_file_is_hashed_by_one_rank(tmp_path, monkeypatch):
    """Rank 1 of 2 hashes files 1 and 3 only, takes files 0 and 2 from rank 0's gathered hashes, gets the
    single-process fingerprint, and leaves the cache to rank 0."""
    import biaslab.distributed as D
    from biaslab.models import fingerprint as FP

    d = _shards(tmp_path)
    one = FP.checkpoint_fingerprint(d)
    hashed, real = [], FP._hash_files
    monkeypatch.setattr(FP, "_hash_files", lambda files, progress: hashed.extend(f.name for f in files) or real(files, progress))
    rank0 = {i: {"sha256": h} for i, h in zip((0, 2), real([sorted(d.glob("*.safetensors"))[i] for i in (0, 2)], False))}
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "all_gather", lambda obj: [(rank0, True, *obj[2:]), obj])   # the same copy's signature
    cache = tmp_path / "fp.json"
    assert FP.checkpoint_fingerprint(d, cache) == one
    assert hashed == ["model-00002-of-00003.safetensors", "config.json"] and not cache.exists()
    monkeypatch.setattr(D, "rank", lambda: 0)
    monkeypatch.setattr(D, "all_gather", lambda obj: [obj, ({1: {"sha256": "x"}, 3: {"sha256": "y"}}, True, *obj[2:])])
    assert FP.checkpoint_fingerprint(d, cache) != one                    # rank 1's hashes are used as given
    assert len(json.loads(cache.read_text())) == 4                       # rank 0 writes every file's record


# ------------------------------------------------------------------------------------------------ data parallel
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, world: int, tmp_path, port=None, launcher="torchrun", cwds=None, exe=("-m", "biaslab")):
    """The ranks of one job, started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_* in the env), the way
    Open MPI's mpirun does (``launcher="mpi"``: OMPI_COMM_WORLD_*, MASTER_PORT only, as accelerate's launcher), or
    as srun starts one task per node (``"slurm"``: SLURM_STEP_*, SLURM_PROCID/LOCALID/NODEID, MASTER_PORT only).
    ``args`` may be a list per rank; ``cwds`` a working directory per rank (nodes with their own files); ``exe``
    what runs before the arguments (``[]`` for ``python -c CODE``)."""
    port = port or _free_port()
    procs = []
    for r in range(world):
        ranks = {"mpi": {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
                         "OMPI_COMM_WORLD_SIZE": str(world), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world)},
                 "slurm": {"SLURM_STEP_NUM_TASKS": str(world), "SLURM_STEP_NUM_NODES": str(world),
                           "SLURM_STEP_TASKS_PER_NODE": f"1(x{world})", "SLURM_STEP_NODELIST": "localhost,node-b",
                           "SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r), "SLURM_JOB_ID": "7"},
                 "torchrun": {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                              "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}}[launcher]
        env = {**os.environ, **ranks, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "BIASLAB_PROGRESS": "0", "BIASLAB_CACHE": str(tmp_path / "cache"), "BIASLAB_DIST_TIMEOUT": "120"}
        argv = args[r] if args and isinstance(args[0], list) else args
        procs.append(subprocess.Popen([sys.executable, *exe, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=cwds[r] if cwds else None))
    return procs


def _run(args, world, tmp_path, launcher="torchrun"):
    procs = _launch(args, world, tmp_path, launcher=launcher)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    return outs[0][0]


def _records(run_dir):
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in open(run_dir / "records.jsonl"))


def _torchrun_two_nodes(args, tmp_path) -> str:
    """The SLURM recipe's shape with torchrun itself: two agents (``--nnodes=2 --node_rank=0|1``, one process each,
    so both ranks have LOCAL_RANK 0) meeting on a static rendezvous; returns rank 0's stdout."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIASLAB_PROGRESS": "0", "BIASLAB_CACHE": str(tmp_path / "cache"),
           "BIASLAB_DIST_TIMEOUT": "120"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                "-m", "biaslab", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for n in (0, 1)]
    outs = [a.communicate(timeout=600) for a in agents]
    assert all(a.returncode == 0 for a in agents), outs[0][1][-1500:] + outs[1][1][-1500:]
    assert outs[1][0] == ""                                             # node 1's rank prints nothing
    return outs[0][0]


def test_two_process_audit_equals_one_process(tiny_dir, tmp_path):
    """Launched by torchrun as two nodes, each rank loading through --device-map auto: rank 0 alone writes, and
    the values, bootstrap intervals and records equal one process's; the manifest records the layout."""
    args = ["audit", "--model", str(tiny_dir), "--bench", "crows,winobias", "--limit", "70", "--n-boot", "200",
            "--format", "json", "-q"]
    two = json.loads(_torchrun_two_nodes(args + ["--out", str(tmp_path / "two"), "--device-map", "auto"], tmp_path))
    one = json.loads(_run(args + ["--out", str(tmp_path / "one")], 1, tmp_path))   # reads the fingerprints cached by two
    assert one["benchmarks"] == two["benchmarks"]                       # values and bootstrap intervals identical
    from biaslab.models.fingerprint import checkpoint_fingerprint

    fps = {json.loads((tmp_path / r / "manifest.json").read_text())["model"]["fingerprint"] for r in ("one", "two")}
    assert fps == {checkpoint_fingerprint(tiny_dir)}                     # the files hashed one per rank, then gathered
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert (tmp_path / "two" / "report.html").is_file()
    env_two = json.loads((tmp_path / "two" / "manifest.json").read_text())["environment"]
    assert env_two["processes"] == {"world_size": 2, "backend": "gloo", "processes_per_node": 1, "nodes": 2}
    assert "processes" not in json.loads((tmp_path / "one" / "manifest.json").read_text())["environment"]


def test_more_ranks_than_chunks_idle_cleanly(tiny_dir, tmp_path):
    """Launched the way mpirun launches (accelerate launch on CPUs): the ranks come from MPI's variables."""
    out = _run(["audit", "--model", str(tiny_dir), "--bench", "crows", "--limit", "3", "--n-boot", "20",
                "--format", "json", "-q", "--out", str(tmp_path / "a")], 2, tmp_path, launcher="mpi")
    assert json.loads(out)["benchmarks"]["crows"]["n_items"] == 3
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["environment"]["processes"] == {
        "world_size": 2, "backend": "gloo", "launcher": "mpi", "processes_per_node": 2}


def test_a_dry_run_on_two_ranks_calibrates_on_both(tiny_dir, tmp_path):
    """Each rank times its own items (the slowest counts) and the estimate is the busiest rank's share: 40 CrowS
    items in one chunk of 128 are one rank's work, so the estimate is the single process's."""
    args = ["audit", "--model", str(tiny_dir), "--bench", "crows", "--limit", "40", "--dry-run", "--format", "json",
            "--out", str(tmp_path / "d")]
    plan = json.loads(_run(args, 2, tmp_path))
    row = plan["rows"][0]
    assert row["items"] == 40 and row["estimated_s"] == pytest.approx(40 * row["s_per_item"])
    assert any(n.startswith("2 processes: s / item is the slowest rank's") for n in plan["notes"])
    assert not (tmp_path / "d").exists()


def test_srun_tasks_on_two_nodes_run_one_job(tiny_dir, tmp_path):
    """Two srun tasks, one per node (no torchrun): one job, its rendezvous on the step's first host, rank 0 alone
    writing; the records equal one process's."""
    args = ["audit", "--model", str(tiny_dir), "--bench", "crows", "--limit", "12", "--n-boot", "20", "--format",
            "json", "-q"]
    two = json.loads(_run(args + ["--out", str(tmp_path / "two")], 2, tmp_path, launcher="slurm"))
    one = json.loads(_run(args + ["--out", str(tmp_path / "one")], 1, tmp_path))
    assert one["benchmarks"] == two["benchmarks"] and _records(tmp_path / "one") == _records(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["environment"]["processes"] == {
        "world_size": 2, "backend": "gloo", "launcher": "slurm", "processes_per_node": 1, "nodes": 2}


def test_env_reports_every_rank(tiny_dir, tmp_path):
    """``biaslab env`` under 2 processes: rank 0 prints each rank's view (rank, device, dtype, threads), the
    launcher's variables it read and the cache; nothing is loaded or written."""
    report = json.loads(_run(["env", "--format", "json", "--dtype", "bf16", "--model", str(tiny_dir), "--device-map",
                              "auto"], 2, tmp_path))
    procs = report["processes"]
    assert [p["rank"] for p in procs] == [0, 1] and {p["world_size"] for p in procs} == {2}
    assert [p["local_rank"] for p in procs] == [0, 1] and {p["backend"] for p in procs} == {"gloo"}
    assert {(p["device"], p["dtype"], p["threads"]) for p in procs} == {("cpu", "bfloat16", 1)}
    assert report["environment"]["WORLD_SIZE"] == "2" and report["cache"]["path"] == str(tmp_path / "cache")
    assert report["cache"]["writable"] and not (tmp_path / "cache").exists()   # made on first use, not by env
    assert all(p["placement"]["fits"] and set(p["placement"]["devices"]) == {"cpu"} for p in procs)   # each rank's


def test_env_plans_a_placement_as_the_load_places_it(tiny_dir, monkeypatch):
    """``biaslab env --model`` plans the placement on the meta-device model with Accelerate's planner: what it says
    would go to disk is what a real load with the same map and caps finds no room for (6.1 MiB: all 20 tensors of
    the tiny model under a 10 KB cap; the larger cap, everything on the CPU). Nothing is loaded."""
    from biaslab.models import load_model
    from biaslab.models.plan import plan_placement, render_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_placement(str(tiny_dir), device_map="auto", max_memory="cpu=10KB")
    assert not plan["fits"] and set(plan["devices"]) == {"disk"}
    assert render_plan(plan).endswith("does NOT fit: 6.1 MiB would go to disk, which biaslab does not use; give the "
                                      "devices more (--max-memory), more GPUs, or a smaller --dtype")
    with pytest.raises(BiaslabError, match=r"6\.1 MiB of weights \(20 tensors"):
        load_model(str(tiny_dir), device_map="auto", max_memory="cpu=10KB")
    plan = plan_placement(str(tiny_dir), device_map="sequential", max_memory="cpu=1GiB", dtype="bf16")
    assert plan["fits"] and plan["dtype"] == "bfloat16" and plan["devices"]["cpu"]["bytes"] == plan["weights_bytes"]
    params = sum(t.numel() * 2 for t in load_model(str(tiny_dir)).model.parameters())
    assert 0 <= plan["weights_bytes"] - params < 1024                    # the bf16 weights, plus the rotary buffer
    plan = plan_placement(str(tiny_dir))   # no map: the weights against the device's free memory
    assert plan["fits"] and render_plan(plan).startswith(f"placement of {tiny_dir} (float32, 6.1 MiB of weights): cpu")


def test_env_reports_the_float16_fallback_as_a_note(monkeypatch):
    """On a GPU without native bf16 ``--dtype auto`` loads float16 with a warning: ``env`` reports it as that rank's
    note (and the dtype), not as a stray warning line."""
    import biaslab.models.loading as L
    from biaslab.machine import process_view

    monkeypatch.setattr(L, "pick_device", lambda d=None: "cuda:0")
    monkeypatch.setattr(L, "_native_bf16", lambda d: False)
    monkeypatch.setattr(L, "_cuda_index", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # no GPU list to read here
    view = process_view()
    assert view["dtype"] == "float16" and len(view["notes"]) == 1
    assert view["notes"][0].startswith("cuda:0: Tesla V100 has no native bfloat16")


def test_env_text_names_each_rank_gpu_block():
    """The text form of a GPU node's report (hand-made: no GPU here): each rank's block with free/total memory, a GPU
    without native bf16 flagged, the float16 note, CUDA and NCCL versions; an unwritable cache says what to set."""
    from biaslab.machine import render_text

    gpu = {"name": "H100", "capability": "9.0", "total_gib": 79.6, "free_gib": 78.9, "native_bf16": True}
    procs = [{"rank": r, "world_size": 2, "host": "n1", "local_rank": r, "backend": "nccl", "device": f"cuda:{2 * r}",
              "dtype": "bfloat16", "threads": 8, "tree_kernel": "sdpa", "cuda": "12.8", "nccl": "2.27.3", "notes": [],
              "gpus": [{**gpu, "index": 2 * r}, {**gpu, "index": 2 * r + 1}]} for r in (0, 1)]
    procs[1]["gpus"][1] = {**gpu, "index": 3, "name": "V100", "native_bf16": False}
    procs[1]["notes"] = ["cuda:2: V100 has no native bfloat16"]
    report = {"python": "3.11", "platform": "Linux", "packages": {"torch": "2.13.0", "gguf": None},
              "hub_kernels": "off", "cache": {"path": "/c", "exists": False, "writable": False}, "environment": {},
              "launcher": "slurm (its ranks copied into torch's variables)", "processes": procs}
    text = render_text(report)
    assert "packages: torch 2.13.0\n" in text and "NOT writable: set BIASLAB_CACHE" in text
    assert "launcher: slurm (its ranks copied into torch's variables)\n" in text
    assert ("rank 1/2 on n1 (local rank 1, nccl): device cuda:2, dtype bfloat16, 8 threads, tree kernel sdpa; GPUs "
            "2: H100 78.9 of 79.6 GiB free; 3: V100 78.9 of 79.6 GiB free, no native bf16; CUDA 12.8, NCCL 2.27.3") in text
    assert "  note: cuda:2: V100 has no native bfloat16" in text


def test_srun_tasks_with_their_own_commands_run_alone(tmp_path):
    """srun tasks given different commands (``srun -n 2 bash -c 'biaslab … --out r$SLURM_PROCID'``, a job-array
    pattern) ran as independent processes before srun's variables were adopted; they still do, with a note —
    only tasks with the same command run as one job."""
    procs = _launch([["env", "--format", "json"], ["env", "--format", "json", "--dtype", "bf16"]], 2, tmp_path,
                    launcher="slurm")
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[1][1][-1500:]
    for (out, err), dtype in zip(outs, ("float32", "bfloat16")):
        report = json.loads(out)
        assert [(v["rank"], v["world_size"], v["dtype"]) for v in report["processes"]] == [(0, 1, dtype)]
        assert report["launcher"] == "none: one process" and "RANK" not in report["environment"]
        assert "the srun tasks run different commands, so each runs alone" in err


def test_ranks_that_disagree_stop_with_one_line(tmp_path):
    """Ranks started with other arguments (rank 0 alone prints that, a usage error, and any error every rank
    meets alike; a rank's own error is printed by it, with its rank), or whose node-local copies of the checkpoint differ (here: each rank's
    working directory holds its own ``./model``, rank 1's with other weights), stop at once with the rank and what
    differs — instead of cutting other chunks, or scoring two models as one."""
    procs = _launch([["env"], ["env", "--dtype", "bf16"]], 2, tmp_path)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs)
    assert "rank 1 was started with another command than rank 0 (`biaslab env --dtype bf16` vs `biaslab env`)" in errs[0]
    assert "another command" not in errs[1], errs[1]   # one line for the job, not one per rank
    procs = _launch(["env", "--no-such-option"], 2, tmp_path)   # a usage error: rank 0 alone shows it
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs) and "--no-such-option" in errs[0] and errs[1] == "", errs
    procs = _launch(["audit", "--bench", "crows"], 2, tmp_path)   # the same check fails on both: one line
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert errs[0].count("error: --out DIR is required") == 1 and errs[1] == "", errs
    code = ("import sys; from biaslab import cli, distributed as D; from biaslab.cli import app\n"
            "from biaslab.errors import BiaslabError\n@app.command('fail-on-rank-1')\ndef fail():\n"
            "    if D.rank() == 1: raise BiaslabError('node-b.jsonl, line 3: bad field')\n    D.barrier()\n"
            "sys.argv = ['biaslab', 'fail-on-rank-1']; cli.main()")
    procs = _launch(["-c", code], 2, tmp_path, exe=[])   # an error of one rank's own: that rank prints it, named
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "error: rank 1: node-b.jsonl, line 3: bad field" in errs[1] and "another process" in errs[0], errs
    for r in (0, 1):   # a checkpoint's files (the fingerprint reads bytes only): rank 1's weights differ at the end
        d = tmp_path / f"node{r}" / "model"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(bytes(3 << 20) + bytes([r]))
    code = ("import sys; from biaslab import distributed as D; from biaslab.errors import BiaslabError\n"
            "from biaslab.models.fingerprint import checkpoint_fingerprint as f\nD.init_from_env()\n"
            "try: print(f('model'))\nexcept BiaslabError as e: sys.exit(str(e))")
    procs = _launch(["-c", code], 2, tmp_path, cwds=[tmp_path / "node0", tmp_path / "node1"], exe=[])
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 1 for p in procs), errs
    assert "rank 1 (on " in errs[0] and "reads another copy of the checkpoint model than rank 0" in errs[0], errs[0]
    assert "model.safetensors has other bytes there (its first or last MiB)" in errs[0] and errs[0] == errs[1]
    (tmp_path / "node1" / "model" / "model.safetensors").write_bytes(bytes(3 << 20) + bytes([0]))
    outs = [p.communicate(timeout=120) for p in _launch(["-c", code], 2, tmp_path, exe=[],
                                                           cwds=[tmp_path / "node0", tmp_path / "node1"])]
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("sha256-files:"), outs   # the same copies: one id


def test_two_process_crispr_fit_chooses_the_same_neurons(tiny_dir, tmp_path):
    """The attribution is sharded by batch (14 batches here) and summed in batch order, the dev search's items by
    chunk (130 items: 3 chunks): same scores, same search path, same neurons, same evaluation, same intervals."""
    args = ["mitigate", "crispr", "--model", str(tiny_dir), "--task", "sst2", "--search", "--search-max", "8",
            "--search-dev-limit", "130", "--instructions", "2", "--dev-size", "24", "--token-budget", "256",
            "--control-seeds", "1", "--no-retention", "--limit", "30", "--n-boot", "100", "--format", "json", "-q"]
    one = json.loads(_run(args + ["--out", str(tmp_path / "one")], 1, tmp_path))
    two = json.loads(_run(args + ["--out", str(tmp_path / "two")], 2, tmp_path))
    one.pop("timings_s"), two.pop("timings_s")
    assert one == two
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "patch.safetensors"), load_file(tmp_path / "two" / "patch.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # export has nothing to share: under torchrun rank 0 alone runs it (it failed on rank 1, where save_pretrained
    # writes nothing once a process group exists)
    procs = _launch(["export", "--model", str(tiny_dir), "--patch", str(tmp_path / "two" / "patch.safetensors"),
                     "--out", str(tmp_path / "exported")], 2, tmp_path)
    (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err0[-1500:] + err1[-1500:]
    assert "verified: reloaded" in out0 and "the 1 other rank(s) of this launch had nothing to do" in err0
    assert out1 == err1 == "" and (tmp_path / "exported" / "model.safetensors").is_file()


def test_a_killed_rank_then_a_rerun_ends_with_the_same_results(tiny_dir, tmp_path):
    args = ["audit", "--model", str(tiny_dir), "--bench", "winobias", "--limit", "320", "--n-boot", "50", "--format",
            "json", "-q"]
    procs = _launch(args + ["--out", str(tmp_path / "two")], 2, tmp_path)
    journal = tmp_path / "two" / "records.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
        if journal.is_file() and journal.read_text().count("chunk_done") >= 2:
            break
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)                                 # rank 1 dies mid-run
    err0 = procs[0].communicate(timeout=300)[1]
    procs[1].communicate(timeout=60)
    done = journal.read_text().count("chunk_done")
    assert procs[0].returncode != 0 and "rerun the same command to resume" in err0, err0[-1500:]
    assert 2 <= done < 5                                                # 320 items / 64 per chunk = 5 chunks
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    before = [json.loads(x)["chunk_done"] for x in open(journal) if "chunk_done" in x]
    two = json.loads(_run(args + ["--out", str(tmp_path / "two")], 2, tmp_path))   # the rerun resumes
    one = json.loads(_run(args + ["--out", str(tmp_path / "one")], 1, tmp_path))
    assert one["benchmarks"] == two["benchmarks"]
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    # the chunks do not depend on the world size, so the job may resume on fewer processes (a preempted job
    # given fewer GPUs): one process scores only the missing chunks and ends with the same results
    switched = json.loads(_run(args + ["--out", str(tmp_path / "two_then_one")], 1, tmp_path))
    assert switched["benchmarks"] == one["benchmarks"]
    assert _records(tmp_path / "two_then_one") == _records(tmp_path / "one")
    chunks = [json.loads(x)["chunk_done"] for x in open(tmp_path / "two_then_one" / "records.jsonl") if "chunk_done" in x]
    assert sorted(chunks) == list(range(5)) and chunks[:done] == before        # the finished chunks were kept, not redone


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_a_process_group_that_cannot_start_is_one_line(tmp_path, launcher):
    """No rank 0 to meet: the collective times out (BIASLAB_DIST_TIMEOUT) and the error names the backend and the
    environment it read (and, for an srun task, that it came from Slurm's variables) — no C++ stack, no hang."""
    ranks = ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"} if launcher == "torchrun"
             else {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_PROCID": "1",
                   "SLURM_LOCALID": "1", "SLURM_NODEID": "0"})
    env = {**os.environ, **ranks, "MASTER_PORT": str(_free_port()), "BIASLAB_DIST_TIMEOUT": "2",
           "BIASLAB_PROGRESS": "0"}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-m", "biaslab", "benchmarks"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "could not start the gloo backend" in r.stderr and "MASTER_PORT=" in r.stderr, r.stderr[-800:]
    assert ("(copied from slurm's variables)" in r.stderr) == (launcher == "slurm")
    assert "frame #" not in r.stderr and "Traceback" not in r.stderr


TRACE_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from biaslab import distributed as D
D.init_from_env()
from conftest import make_tiny_llama
from biaslab.models import LanguageModel
from biaslab.tracing import TraceItem, trace
model, tok = make_tiny_llama(seed=3, layers=3)
lm = LanguageModel(model, tok, spec="t", progress=False)
words = ["nurse", "doctor", "cat", "software engineer", "x"]
items = [TraceItem(f"t{i}", f"The {w} is", (4, 4 + len(w)), " here") for i, w in enumerate(words)]
res = trace(lm, items, n_noise=2, seed=5)
out = {"trace": {**{k: v.tolist() for k, v in res.per_item.items()}, "clean": res.p_clean.tolist(),
                 "corrupt": res.p_corrupt.tolist(), "params": res.params}}
# SR_LLM's LoRA with gradient parts: batches of 5 in parts of 2 (3 parts: rank 1 idles in the second round, and
# the last batch of 1 is a single part), dropout on, early-stopping checks every step
from biaslab.methods.srllm.config import SRLLMConfig
from biaslab.methods.srllm.data import RewritePair
from biaslab.methods.srllm.training import train_lora
pairs = [RewritePair(f"t:{i}", "wnc", f"the brilliant singer number {i} performed .", f"the singer number {i} performed .",
                     "subjective") for i in range(6)]
cfg = SRLLMConfig(r=4, alpha=8, dropout=0.1, lr=2e-2, batch_size=5, micro_batch_size=2, eval_every=1, patience=5, epochs=2)
fit = train_lora(lm, pairs, pairs[:3], cfg, progress=False, max_steps=3)
out["lora"] = {"tensors": {k: v.flatten().tolist() for k, v in sorted(fit.patch.tensors.items())},
               "train_loss": fit.history["train_loss"], "val_loss": fit.history["val_loss"]}
# FAST's stamp with --micro-batch-pairs 2: 3 pairs (2 parts) + 2 subject prompts (1) + 1 window (1) per step, JS on
from biaslab.methods import fast as F
def pair(i, p1, p2, obj, t1, t2):
    a, b = p1.index(t1), p2.index(t2)
    return F.KnowledgePair(id=f"p{i}", bias_type="gender", target=t1, counterpart=t2, prompt_1=p1, prompt_2=p2,
                           object=obj, span_1=(a, a + len(t1)), span_2=(b, b + len(t2)), statement=f"s{i}")
kp = [pair(0, "The schoolgirl was very", "The schoolboy was very", "emotional", "schoolgirl", "schoolboy"),
      pair(1, "My mother is always", "My father is always", "cooking", "mother", "father"),
      pair(2, "Her sister is so", "His brother is so", "gossipy", "sister", "brother")]
fcfg = F.FastConfig(steps=2, lr=1e-2, width=8, batch_pairs=3, batch_subject=2, batch_text=1, n_subject_prompts=3,
                    n_text=2, text_tokens=8, fairness="gap+js", micro_batch_pairs=2)
from biaslab.methods.fast import training as FT
FT.DEV_CHUNK = 2                    # the 3 dev pairs in 2 shards, one per rank
st = F.train(lm, kp, 1, fcfg, dev_pairs=kp)
out["fast"] = {"history": st.history, "stamp": {k: v.flatten().tolist() for k, v in st.stamp.state_dict().items()},
               "dev_ss": st.dev_ss, "dev": FT.dev_stats(lm, kp, shared=True)}
# a soft prompt with --micro-batch-size 2: batches of 5 in 3 parts (rank 1 idles in the second round), then of 1
from biaslab.probes.data import Sentence
from biaslab.probes import prompt_training
from biaslab.probes.prompt_training import train_soft_prompt
from biaslab.probes.softprompt import SoftPromptConfig
prompt_training.VAL_CHUNK = 2       # the 3 validation sentences in 2 shards, one per rank
sents = [Sentence(f"s{i}", t, i % 3) for i, t in enumerate(
    ["a fine film .", "dull and slow", "it was fine", "the best ever made", "not good", "okay i guess"])]
sp = train_soft_prompt(lm, SoftPromptConfig(virtual_tokens=2, batch_size=5, lr=0.05), sents, sents[:3],
                       progress=False, micro_batch_size=2)
out["prompt"] = {"embeddings": sp.embeddings.flatten().tolist(), "losses": sp.info["losses"], "val": sp.val_accuracy}
# `biaslab rewrite`'s texts in chunks of 2 (3 chunks: rank 1 idles in the second round); text 4 is cut, with a notice
from biaslab.methods.srllm.rewriting import rewrite_shared
rw = rewrite_shared(lm, ["the nurse said she was tired", "he is a doctor", "x", "word " * 20, "the cat"],
                    max_input_tokens=12, max_new_cap=3, chunk=2)
out["rewrite"] = {"rewrites": rw.rewrites, "notices": rw.notices, "limits": rw.max_new_tokens}
if D.rank() == 0:
    print(json.dumps(out), flush=True)
if D.world_size() > 1:   # leave together: a rank that exits while its peer still tears down gloo can abort
    import torch.distributed as dist
    D.barrier()
    dist.destroy_process_group()
"""


def test_two_process_causal_tracing_lora_and_stamp_training_equal_one_process(tmp_path):
    """FAST's causal tracing is sharded over pairs (pair n on rank n mod W); each rank still draws every pair's
    noise in order, so the per-pair effects — and the decisive layer — equal the one-process run exactly.
    SR_LLM's LoRA with --micro-batch-size shares each batch's parts across ranks and adds their gradients in part
    order: the adapter, the losses and the validation losses equal the one-process run bit for bit. FAST's stamp
    with --micro-batch-pairs likewise: the same stamp, loss terms and dev-split diagnostics (shared by chunk), and a
    soft prompt with --micro-batch-size;
    ``rewrite``'s texts shared by chunk give the same rewrites and notices."""
    from pathlib import Path

    tests = str(Path(__file__).parent)

    def run(world):
        port = _free_port()
        procs = []
        for r in range(world):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "BIASLAB_PROGRESS": "0", "BIASLAB_DIST_TIMEOUT": "120"}
            procs.append(subprocess.Popen([sys.executable, "-c", TRACE_WORKER, tests], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (o, e) in zip(procs, outs):
            assert p.returncode == 0, e[-2000:]
        return json.loads(outs[0][0])

    one, two = run(1), run(2)
    assert one["trace"] == two["trace"] and len(one["trace"]["mlp"]) == 5
    assert one["lora"] == two["lora"] and len(one["lora"]["train_loss"]) == 3 and len(one["lora"]["val_loss"]) == 3
    assert one["fast"] == two["fast"] and len(one["fast"]["history"]) == 2 and one["fast"]["history"][0]["JS"] > 0
    assert one["fast"]["dev"]["n"] == 3 and one["fast"]["dev_ss"] is not None   # the dev split shared by chunk
    assert one["prompt"] == two["prompt"] and len(one["prompt"]["losses"]) == 2
    assert one["rewrite"] == two["rewrite"] and len(one["rewrite"]["rewrites"]) == 5
    assert [n.split(" has ")[0] for n in one["rewrite"]["notices"]] == ["text 4"]   # numbered over all the texts


def test_two_process_soft_prompt_probe_equals_one_process(tiny_dir, tmp_path):
    """The sweep's prompts are shared out across ranks (each trained whole on one rank, as alone) and gathered;
    the scoring is sharded by chunk: the same prompts, the same kept runs, the same gaps and intervals."""
    def args(tag):
        return ["probe", "softprompt", "--model", str(tiny_dir), "--runs", "2", "--seeds", "0,1", "--lrs", "0.01",
                "--train-limit", "12", "--val-limit", "8", "--test-limit", "8", "--template-limit", "12",
                "--epochs", "1", "--batch-size", "4", "--virtual-tokens", "2", "--no-hand-prompts", "--format", "json",
                "-q", "--prompt-cache", str(tmp_path / f"cache-{tag}"), "--out", str(tmp_path / tag)]
    one = json.loads(_run(args("one"), 1, tmp_path))
    two = json.loads(_run(args("two"), 2, tmp_path))
    for d in (one, two):
        for k in ("timings_s", "cpu_s"):
            d.pop(k, None)
        for r in d.get("sweep", []):
            r.pop("train_cpu_s", None)
    assert one == two and len(list((tmp_path / "two" / "prompts").iterdir())) == 2
