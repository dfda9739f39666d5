"""Zero-knowledge proofs that a block's output follows from its input and committed weights (ezkl, halo2 + KZG).

A circuit is made per (weights, input shape): the module is exported to ONNX with its weights as *fixed* columns,
so the verifying key itself commits to the weights: a verifier who makes the keys from its own copy of the
reference weights (or takes the verifying key from a list it trusts) accepts only proofs computed with exactly those
weights. The input and output are public: the verifier checks that the proof's input is the one it sent (at the
circuit's fixed-point scale) and that the output the server returned is within the circuit's quantization bound of
the proven one.

Costs (measured on a 2-core CPU, see the README): keys take tens of seconds to minutes and hundreds of MB, proofs
take seconds to minutes, verification milliseconds. So proofs are for sampled steps, made after the reply and
checked later.

The structured reference string is made locally (``ezkl.gen_srs``), which is sound only if whoever made it threw
its secret away: fine for tests and for a verifier that makes its own; a deployment would use a public ceremony's
(``ezkl.get_srs``, not reachable offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_PROOF_BYTES = 16 * 2**20  # a proof of one of our circuits is ~50-200 KB; anything far larger is refused unread
_LOCK = threading.Lock()  # ezkl's calls are not documented as thread-safe; one at a time per process
# How range checks split a value: ezkl's default (2 digits of 2^14) needs a 2^14-row table, which alone sets a small
# circuit's size at 2^15 rows; 3 digits of 2^10 cover as much (2^30 >= 2^28) with a 2^10-row table, for more rows of
# digits. Circuits are made with whichever gives fewer rows (the same choice on every machine): a two-layer MLP's
# keys take 5.2 s instead of 29.6 s (both calibrations included) and its proofs 1.9 s instead of 14 s; a hidden-16
# Llama layer keeps the default (2^16 rows otherwise).
DECOMPOSITIONS = ((16384, 2), (1024, 3))
SMALL_CIRCUIT_LOGROWS = 15  # at most this many (log2) with the default: the smaller table may shrink it


class ProofError(ValueError):
    """A proof that is malformed, for another input, made with other weights, or that does not verify."""


def _keep_ezkl_files_in(directory: Path) -> None:
    """ezkl caches lookup tables in $EZKL_REPO_PATH (default ~/.ezkl), read at its first use: unless the user chose
    a place, keep them beside the circuits instead of in the home directory."""
    os.environ.setdefault("EZKL_REPO_PATH", str(directory / "ezkl"))


def _ezkl():
    try:
        import ezkl
    except ImportError as e:  # an optional dependency: pip install "swarm[zk]"
        raise RuntimeError("zero-knowledge proofs need ezkl: pip install ezkl onnx") from e
    return ezkl


@dataclass(frozen=True)
class CircuitStats:
    logrows: int
    input_scale: int
    param_scale: int
    setup_seconds: float
    proving_key_bytes: int
    verifying_key_bytes: int


class Circuit:
    """The circuit of ``module`` on inputs of ``shape`` (float32), with its keys, in ``directory``.

    ``Circuit.make(module, shape, directory, samples)`` exports, calibrates on ``samples`` (inputs like the real
    ones: the fixed-point scale must fit their range), compiles and makes the keys; a later ``make`` with the same
    weights and shape in the same directory finds them there.
    """

    def __init__(self, directory: Path, shape: tuple[int, ...]):
        self.directory, self.shape = Path(directory), tuple(shape)
        _keep_ezkl_files_in(self.directory.parent)
        self.settings = json.loads((self.directory / "settings.json").read_text())

    @property
    def input_scale(self) -> int:
        return int(self.settings["run_args"]["input_scale"])

    @property
    def output_scale(self) -> int:
        scales = self.settings.get("model_output_scales") or [self.input_scale]
        return int(scales[0])

    @property
    def tolerance(self) -> float:
        """How far (max abs) an honest float output may be from the proven one: four times the error measured on
        the calibration inputs, and at least a few steps of the output's fixed-point scale."""
        made = json.loads((self.directory / "made.json").read_text())
        return max(4 * float(made["measured_error"]), 8 / 2**self.output_scale)

    def path(self, name: str) -> str:
        if name == "kzg.srs":
            return (self.directory / "srs.txt").read_text()
        return str(self.directory / name)

    @classmethod
    def make(cls, module: torch.nn.Module, shape: tuple[int, ...], directory: str | Path,
             samples: list[torch.Tensor] | None = None, logrows: int | None = None,
             srs_directory: str | Path | None = None, scales: list[int] | None = None) -> Circuit:
        """``directory``: a cache root; the circuit lives in a subdirectory named by a hash of the weights, shape
        and samples, so two parties that make the circuit of the same weights get the same circuit (and, with the
        same SRS, the same verifying key). ``samples``: calibration inputs (default: fixed pseudo-random ones).
        ``logrows``: force the circuit's size (default: what calibration finds). ``scales``: the fixed-point scales
        (log2) calibration may choose from (default: ezkl's search, which favours precision; a lower scale shrinks
        the lookup tables, and so the circuit, by 2x per step). ``srs_directory``: where the
        structured reference strings are (``kzg-ROWS.srs``; made there if missing): prover and verifier must use the
        same one (default: ``directory``)."""
        import fcntl
        import time

        _keep_ezkl_files_in(Path(directory))
        ezkl = _ezkl()
        if not samples:  # the same on every machine: both sides of a proof must calibrate alike
            generator = torch.Generator().manual_seed(0)
            samples = [torch.randn(shape, generator=generator) * spread for spread in (1.0, 3.0)]
        digest = hashlib.sha256(repr((tuple(shape), logrows, scales, DECOMPOSITIONS)).encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
        for sample in samples:
            digest.update(sample.detach().float().contiguous().numpy().tobytes())
        root = Path(directory) / digest.hexdigest()[:24]
        srs_directory = Path(srs_directory or directory)
        root.mkdir(parents=True, exist_ok=True)
        srs_directory.mkdir(parents=True, exist_ok=True)
        # one maker per circuit, across processes (a server and a client may share the directory)
        with open(root / ".lock", "w") as lock, _LOCK:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (root / "made.json").exists():
                return cls(root, shape)
            started = time.perf_counter()
            example = samples[0].reshape(shape)
            torch.onnx.export(module.eval(), (example,), str(root / "block.onnx"), input_names=["input"],
                              output_names=["output"], opset_version=17, dynamo=False)
            (root / "calibration.json").write_text(json.dumps(
                {"input_data": [torch.cat([s.reshape(shape).flatten() for s in samples]).tolist()]}))
            settings: dict | None = None
            for base, legs in DECOMPOSITIONS:
                made = _calibrate(ezkl, root, base, legs, scales)
                if settings is None or made["run_args"]["logrows"] < settings["run_args"]["logrows"]:
                    settings = made
                if settings["run_args"]["logrows"] > SMALL_CIRCUIT_LOGROWS:
                    break  # its own rows, not the range checks' table, set its size: a smaller table won't help
            if logrows is not None:
                settings["run_args"]["logrows"] = logrows
            (root / "settings.json").write_text(json.dumps(settings))
            ezkl.compile_circuit(str(root / "block.onnx"), str(root / "block.ezkl"), str(root / "settings.json"))
            rows = json.loads((root / "settings.json").read_text())["run_args"]["logrows"]
            srs = _shared_srs(ezkl, srs_directory, rows)
            (root / "srs.txt").write_text(str(srs.resolve()))
            if not ezkl.setup(str(root / "block.ezkl"), str(root / "vk.key"), str(root / "pk.key"), str(srs)):
                raise RuntimeError("ezkl setup failed")
            setup_seconds = time.perf_counter() - started
            circuit = cls(root, shape)
            with torch.no_grad():
                expected = module(example).float().flatten()
            error = (circuit._witness_output(example) - expected).abs().max().item()
            (root / "made.json").write_text(json.dumps({"setup_seconds": setup_seconds, "measured_error": error}))
        return circuit

    def _witness(self, inputs: torch.Tensor, work: str) -> str:
        """The path of the witness of ``inputs`` (the circuit's values for them), written in ``work``; the caller
        holds ``_LOCK``."""
        data, witness = str(Path(work) / "input.json"), str(Path(work) / "witness.json")
        Path(data).write_text(json.dumps({"input_data": [inputs.detach().float().flatten().tolist()]}))
        _ezkl().gen_witness(data, self.path("block.ezkl"), witness)
        return witness

    def _witness_output(self, inputs: torch.Tensor) -> torch.Tensor:
        """The circuit's own (fixed-point) output for ``inputs``, without a proof (caller holds ``_LOCK``)."""
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            outputs = json.loads(Path(self._witness(inputs, work)).read_text())["outputs"][0]
        return torch.tensor([_ezkl().felt_to_float(felt, self.output_scale) for felt in outputs])

    def stats(self) -> CircuitStats:
        made = json.loads((self.directory / "made.json").read_text())
        run = self.settings["run_args"]
        return CircuitStats(int(run["logrows"]), int(run["input_scale"]), int(run["param_scale"]),
                            float(made["setup_seconds"]), (self.directory / "pk.key").stat().st_size,
                            (self.directory / "vk.key").stat().st_size)

    def verifying_key(self) -> bytes:
        return (self.directory / "vk.key").read_bytes()

    # ---- prover

    def prove(self, inputs: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """(proof as bytes, the proven output as floats) for ``inputs`` of the circuit's shape."""
        ezkl = _ezkl()
        if tuple(inputs.shape) != self.shape:
            raise ValueError(f"this circuit takes inputs of shape {list(self.shape)}, got {list(inputs.shape)}")
        import tempfile

        with _LOCK, tempfile.TemporaryDirectory() as work:
            proof = str(Path(work) / "proof.json")
            ezkl.prove(self._witness(inputs, work), self.path("block.ezkl"), self.path("pk.key"), proof,
                       self.path("kzg.srs"))
            blob = Path(proof).read_bytes()
        return blob, self.proven_output(blob)

    # ---- verifier

    def proven_output(self, blob: bytes) -> torch.Tensor:
        """The output a proof claims, as floats of the circuit's output shape (unchecked: see ``check``)."""
        instances = _instances(blob)
        count = math.prod(self.shape)
        outputs = instances[count:]
        if len(instances) < count or not outputs:
            raise ProofError(f"the proof has {len(instances)} public values; this circuit has {count} inputs and "
                             "some outputs")
        ezkl = _ezkl()
        values = [ezkl.felt_to_float(felt, self.output_scale) for felt in outputs]
        return torch.tensor(values, dtype=torch.float32)

    def check(self, blob: bytes, inputs: torch.Tensor, output: torch.Tensor, tolerance: float) -> None:
        """Raise ``ProofError`` unless ``blob`` is a valid proof, under this circuit's verifying key, that the
        module maps ``inputs`` (the ones the verifier sent) to within ``tolerance`` (max abs) of ``output``."""
        ezkl = _ezkl()
        instances = _instances(blob)
        if tuple(inputs.shape) != self.shape:
            raise ProofError(f"inputs of shape {list(inputs.shape)}, this circuit takes {list(self.shape)}")
        count = math.prod(self.shape)
        if len(instances) <= count:
            raise ProofError(f"the proof has {len(instances)} public values, fewer than the circuit's inputs + 1")
        expected = [ezkl.float_to_felt(float(x), self.input_scale, ezkl.PyInputType.F32)
                    for x in inputs.detach().float().flatten()]
        if [_felt(x) for x in instances[:count]] != [_felt(x) for x in expected]:
            raise ProofError("the proof is for another input")
        proven = self.proven_output(blob)
        if proven.numel() != output.numel():
            raise ProofError(f"the proof has {proven.numel()} outputs, the reply {output.numel()}")
        gap = (proven - output.detach().float().flatten()).abs().max().item()
        if not gap <= tolerance:
            raise ProofError(f"the reply differs from the proven output by {gap:.3g} (bound {tolerance:.3g})")
        import tempfile

        with _LOCK, tempfile.TemporaryDirectory() as work:
            path = Path(work) / "proof.json"
            path.write_bytes(blob)
            try:
                valid = ezkl.verify(str(path), self.path("settings.json"), self.path("vk.key"), self.path("kzg.srs"))
            except Exception as e:  # ezkl raises on proofs it cannot parse or that fail
                raise ProofError(f"the proof does not verify: {str(e)[:200]}") from None
        if not valid:
            raise ProofError("the proof does not verify")


def worker() -> ProcessPoolExecutor:
    """A process of its own for ezkl's work: ezkl holds the GIL for all of a call (keys and proofs take minutes), so
    in a server's or client's process it would stop their event loops. One at a time (each call uses every core)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def stop_worker(executor: ProcessPoolExecutor) -> None:
    """Stop ``executor``'s process now, also in the middle of a proof (what it was doing is lost)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
            process.join(5)


def prove_with(module: torch.nn.Module, shape: tuple[int, ...], directory: str, inputs: torch.Tensor,
               **make: object) -> bytes:
    """In a worker: the proof of ``module`` on ``inputs`` (its circuit made with ``Circuit.make(**make)`` once)."""
    return Circuit.make(module, shape, directory, **make).prove(inputs)[0]


def check_with(module: torch.nn.Module, shape: tuple[int, ...], directory: str, blob: bytes, inputs: torch.Tensor,
               output: torch.Tensor, **make: object) -> None:
    """In a worker: ``Circuit.check`` of ``blob`` under ``module``'s circuit, at the circuit's own tolerance."""
    circuit = Circuit.make(module, shape, directory, **make)
    circuit.check(blob, inputs, output, circuit.tolerance)


def _calibrate(ezkl, root: Path, base: int, legs: int, scales: list[int] | None) -> dict:
    """Settings for ``root``'s block.onnx, calibrated on its calibration.json, with range checks decomposed into
    ``legs`` digits of ``base``."""
    settings = root / "settings-candidate.json"
    args = ezkl.PyRunArgs()
    args.input_visibility, args.output_visibility, args.param_visibility = "public", "public", "fixed"
    # a low starting scale: ezkl refuses modules whose values overflow the field at its default; calibration then
    # raises it as far as the module's range allows
    args.input_scale = args.param_scale = 7
    args.decomp_base, args.decomp_legs = base, legs
    if not ezkl.gen_settings(str(root / "block.onnx"), str(settings), py_run_args=args):
        raise RuntimeError("ezkl could not make settings for this module")
    ezkl.calibrate_settings(str(root / "calibration.json"), str(root / "block.onnx"), str(settings), "resources",
                            scales=scales)
    made = json.loads(settings.read_text())
    settings.unlink()
    return made


def _shared_srs(ezkl, directory: Path, rows: int) -> Path:
    """``directory``'s SRS for circuits of 2**rows rows, made if missing; two processes making it at once agree on
    one (the first to link its file wins)."""
    import tempfile

    srs = directory / f"kzg-{rows}.srs"
    if not srs.exists():
        with tempfile.TemporaryDirectory(dir=directory) as work:
            made = Path(work) / "kzg.srs"
            ezkl.gen_srs(str(made), rows)
            try:
                os.link(made, srs)
            except FileExistsError:
                pass
    return srs


def _instances(blob: bytes) -> list[str]:
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_PROOF_BYTES:
        raise ProofError(f"a proof is at most {MAX_PROOF_BYTES} bytes of JSON")
    try:
        proof = json.loads(blob)
        instances = proof["instances"][0]
        if not (isinstance(instances, list) and all(isinstance(x, str) and len(x) == 64 for x in instances)):
            raise TypeError("instances")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ProofError(f"malformed proof ({type(e).__name__}: {str(e)[:80]})") from None
    return instances


def _felt(value: str) -> str:
    return value.lower().removeprefix("0x")
