"""EDM's pickles are read without running anything in them (issue 21 items 4 and 6): globals outside the
allow-list are refused before anything is called, the module source EDM embeds is kept as text even
when it is a live payload, and truncated, corrupted or incomplete snapshots are ConfigErrors naming the
problem. The fixture snapshot_vp.pkl was written by EDM's own persistence (its source text replaced by a
placeholder of fixed length; see scripts/fixtures/make_edm_fixtures.py)."""

import inspect
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from localdiff.errors import ConfigError
from localdiff.networks.edm import load_edm_network, read_edm_snapshot
from localdiff.networks.edm import snapshot as snapshot_module
from localdiff.networks.edm.snapshot import ALLOWED, ContainerRecord, PersistentRecord, TensorRef, unpickle_snapshot

FIXTURES = Path(__file__).parent / "fixtures" / "edm"
SNAPSHOT = FIXTURES / "snapshot_vp.pkl"
PLACEHOLDER = ("# localdiff test fixture: the Python module source that EDM's persistence embeds here was removed "
               "before pickling.\n").ljust(400, "#")


def payload_source(length: int) -> str:
    """Python that writes the file named by $LOCALDIFF_EDM_MARKER when executed, padded to ``length``."""
    code = "import os\nopen(os.environ['LOCALDIFF_EDM_MARKER'], 'w').write('the embedded source ran')\n"
    assert len(code) < length
    return code.ljust(length, "#")


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "marker"
    monkeypatch.setenv("LOCALDIFF_EDM_MARKER", str(path))
    return path


def vp_outputs(net) -> torch.Tensor:
    z = np.load(FIXTURES / "vp_ddpmpp.npz")
    with torch.no_grad():
        d = net(torch.from_numpy(z["x"]), torch.from_numpy(z["sigma"]))
    torch.testing.assert_close(d, torch.from_numpy(z["D"]), rtol=1e-5, atol=1e-5)
    return d


# -- (a) globals outside the allow-list ---------------------------------------------------------------------

HOSTILE = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "exec"), ("builtins", "eval"),
           ("builtins", "getattr"), ("builtins", "__import__"), ("__builtin__", "eval"), ("subprocess", "Popen"),
           ("subprocess", "check_output"), ("importlib", "import_module"), ("pickle", "loads"), ("torch", "load"),
           ("numpy", "load"), ("copyreg", "_reconstructor"), ("torch_utils.persistence", "_src_to_module"),
           ("dnnlib.util", "construct_class_by_name"), ("training.networks", "VPPrecond")]


@pytest.mark.parametrize("module,name", HOSTILE)
def test_a_global_outside_the_allow_list_is_refused_before_it_runs(tmp_path, marker, module, name):
    """GLOBAL + REDUCE, protocol 0, as a whole file and inside an otherwise plausible snapshot dict."""
    call = b"c" + f"{module}\n{name}\n".encode() + b"(S'touch " + str(marker).encode() + b"'\ntR"
    for i, data in enumerate((call + b".", b"(dp0\nS'ema'\np1\n" + call + b"s.")):
        path = tmp_path / f"evil{i}.pkl"
        path.write_bytes(data)
        refused = rf"the pickle asks for {module}\.{name}, which is not on localdiff's allow-list"
        with pytest.raises(ConfigError, match=refused):
            load_edm_network(path)
    assert not marker.exists()


class Evil:
    def __init__(self, target, arg):
        self.target, self.arg = target, arg

    def __reduce__(self):
        return self.target, (self.arg,)


@pytest.mark.parametrize("target", [os.system, exec, eval, __import__])
def test_pickles_made_by_pickle_dumps_are_refused_too(tmp_path, marker, target):
    """Protocol 4 (STACK_GLOBAL), as pickle.dump writes today; nested inside a snapshot dict."""
    arg = f"touch {marker}" if target is os.system else f"open({str(marker)!r}, 'w')"
    if target is __import__:
        arg = "shutil"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": None, "dataset_kwargs": {"path": Evil(target, arg)}}, protocol=4))
    with pytest.raises(ConfigError, match=rf"asks for {target.__module__}\.{target.__name__}"):
        read_edm_snapshot(path)
    assert not marker.exists()


def test_the_allow_list_holds_only_inert_stand_ins():
    """Nothing on the list can import, execute or touch files: each entry is one of the snapshot module's
    own functions, a stand-in class, or a plain container type."""
    plain = {dict, set, frozenset, snapshot_module.OrderedDict}
    for (module, name), target in ALLOWED.items():
        if target in plain:
            continue
        if inspect.isclass(target):
            assert issubclass(target, ContainerRecord), (module, name)
        else:
            assert target.__module__ == snapshot_module.__name__, (module, name)


def test_a_persistent_id_and_an_extension_code_are_refused(tmp_path):
    for data in (b"\x80\x02P0\n.", b"\x80\x02\x82\x01."):
        path = tmp_path / "p.pkl"
        path.write_bytes(data)
        with pytest.raises(ConfigError):
            read_edm_snapshot(path)


# -- (b) live code in the embedded module source -----------------------------------------------------------


def exec_ing_load(data: bytes, monkeypatch) -> None:
    """What a plain pickle.load with EDM's persistence does with the embedded source: exec() it."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(compile(meta["module_src"], "<embedded>", "exec"), {})  # noqa: S102 - demonstrating the danger

    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)
    try:
        pickle.loads(data)  # noqa: S301 - the point of this helper
    except Exception:  # noqa: BLE001 - the stub returns None where a module is expected; the payload ran before
        pass


def test_a_payload_in_the_module_source_never_runs_and_the_weights_come_back(tmp_path, marker, monkeypatch):
    data = SNAPSHOT.read_bytes()
    assert data.count(PLACEHOLDER.encode()) == 1
    hostile = data.replace(PLACEHOLDER.encode(), payload_source(len(PLACEHOLDER)).encode())
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(hostile)

    net, info = load_edm_network(path)
    vp_outputs(net)
    assert not marker.exists()
    assert info["source_known"] is False
    record = next(iter(info["module_sources"]))
    assert len(record) == 64  # the payload is kept, hashed, as text

    exec_ing_load(hostile, monkeypatch)  # the same file under a loader that executes the source: it runs
    assert marker.read_text() == "the embedded source ran"


# -- (c) truncated and corrupted files ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 2, 11, 100, 5000, 100_000, -400, -1])
def test_a_truncated_snapshot_is_a_config_error(tmp_path, keep):
    data = SNAPSHOT.read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ConfigError, match=r"(truncated or corrupt|neither a pickle|not readable by torch)"):
        load_edm_network(path)


def test_corrupted_bytes_give_a_config_error_or_a_loaded_network_never_a_crash(tmp_path):
    data = bytearray(SNAPSHOT.read_bytes())
    rng = np.random.default_rng(0)
    errors = 0
    for pos in [2, 3, 11, 12, 40, 200, 1000, *rng.integers(0, len(data), 60).tolist()]:
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path = tmp_path / "bad.pkl"
        path.write_bytes(bytes(bad))
        try:
            load_edm_network(path)
        except ConfigError:
            errors += 1
    assert errors >= 5  # flips in the opcodes are caught; flips inside tensor data only change weights


def test_a_file_that_is_not_a_pickle_is_named(tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(b"GIF89a not a network")
    with pytest.raises(ConfigError, match="neither a pickle"):
        load_edm_network(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_edm_network(tmp_path / "absent.pkl")


# -- (d) incomplete states, through snapshots written like EDM's ---------------------------------------------


@pytest.fixture
def persistence(monkeypatch):
    """A stand-in ``torch_utils.persistence`` to *write* pickles in EDM's layout (never used to read)."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("writing only")

    _reconstruct_persistent_obj.__module__ = fake.__name__
    _reconstruct_persistent_obj.__qualname__ = _reconstruct_persistent_obj.__name__
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)
    return fake


class Persistent:
    def __init__(self, fn, class_name, state, src):
        self.fn, self.class_name, self.state, self.src = fn, class_name, state, src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.src, class_name=self.class_name, state=self.state)
        return self.fn, (meta,)


def container(state) -> torch.nn.ModuleDict:
    """A ModuleDict shell holding ``state`` as its __dict__: pickles as NEWOBJ + BUILD, as EDM's do."""
    shell = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
    shell.__dict__.update(state)
    return shell


def rewrite(node, fn, src="# placeholder"):
    """The tree read_edm_snapshot saw, pickled again in EDM's layout (so tests can edit the state)."""
    if isinstance(node, PersistentRecord):
        return Persistent(fn, node.class_name, rewrite(node.state, fn, src), src)
    if isinstance(node, ContainerRecord):
        return container(rewrite(node.state, fn, src))
    if isinstance(node, dict):
        return type(node)((k, rewrite(v, fn, src)) for k, v in node.items())
    if isinstance(node, TensorRef):
        return node.value
    return node


def inert_tree():
    with open(SNAPSHOT, "rb") as f:
        return unpickle_snapshot(f)


def write(tmp_path, persistence, tree, **kw) -> Path:
    path = tmp_path / "snap.pkl"
    path.write_bytes(pickle.dumps(rewrite(tree, persistence._reconstruct_persistent_obj, **kw), protocol=4))
    return path


def test_a_rewritten_snapshot_still_loads(tmp_path, persistence, marker):
    """The writer used by the tests below is faithful: unchanged, its snapshot gives the fixture's D; with a
    payload as source, loading it still runs nothing."""
    vp_outputs(load_edm_network(write(tmp_path, persistence, inert_tree()))[0])
    vp_outputs(load_edm_network(write(tmp_path, persistence, inert_tree(), src=payload_source(200)))[0])
    assert not marker.exists()


def test_a_missing_parameter_is_named(tmp_path, persistence):
    tree = inert_tree()
    ema = tree["ema"]
    del ema.state["_modules"]["model"].state["_modules"]["map_layer0"].state["_parameters"]["weight"]
    with pytest.raises(ConfigError, match=r"1 missing: model\.map_layer0\.weight"):
        load_edm_network(write(tmp_path, persistence, tree))


def test_missing_constructor_arguments_and_module_dicts_are_named(tmp_path, persistence):
    tree = inert_tree()
    del tree["ema"].state["_init_kwargs"]
    with pytest.raises(ConfigError, match=r"\['ema'\] \(VPPrecond\) was pickled without its constructor arguments"):
        load_edm_network(write(tmp_path, persistence, tree))
    tree = inert_tree()
    del tree["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_buffers"]
    with pytest.raises(ConfigError, match=r"model\.enc .* is not a torch module: its state has no _buffers dict"):
        load_edm_network(write(tmp_path, persistence, tree))
    tree = inert_tree()
    tree["ema"].state["_modules"]["model"].class_name = "DhariwalUNet"
    with pytest.raises(ConfigError, match=r"its model is a DhariwalUNet but its arguments say model_type='SongUNet'"):
        load_edm_network(write(tmp_path, persistence, tree))
    tree = inert_tree()
    tree["ema"].class_name = "Precond"  # e.g. an EDM2 network
    with pytest.raises(ConfigError, match=r"unknown EDM preconditioning class 'Precond'"):
        load_edm_network(write(tmp_path, persistence, tree))
    with pytest.raises(ConfigError, match=r"has no network 'ema_0.050'"):
        load_edm_network(SNAPSHOT, key="ema_0.050")


def test_a_torch_file_with_code_is_refused_by_the_weights_only_reader(tmp_path, marker):
    path = tmp_path / "converted.pt"
    torch.save({"init_kwargs": {}, "state_dict": {}, "meta": Evil(os.system, f"touch {marker}")}, path)
    with pytest.raises(ConfigError, match="weights-only reader refuses"):
        load_edm_network(path)
    assert not marker.exists()


class WithState:
    """Pickles as ``target(*args)`` followed by a BUILD with ``state``."""

    def __init__(self, target, args, state):
        self.target, self.args, self.state = target, args, state

    def __reduce__(self):
        return self.target, self.args, self.state


def test_a_state_change_of_a_record_or_a_tensor_is_refused(tmp_path, persistence):
    meta = dict(type="class", version=6, module_src="#", class_name="VPPrecond", state={})
    path = tmp_path / "build.pkl"
    path.write_bytes(pickle.dumps({"ema": WithState(persistence._reconstruct_persistent_obj, (meta,), {"x": 1})}))
    with pytest.raises(ConfigError, match=r"state change \(BUILD\) of the persistent object VPPrecond"):
        read_edm_snapshot(path)
    fn, args = torch.zeros(3).__reduce_ex__(4)
    path.write_bytes(pickle.dumps({"ema": WithState(fn, args, (args[0], 0, (3,), (1,)))}))
    with pytest.raises(ConfigError, match=r"state change \(BUILD\) of a tensor or storage"):
        read_edm_snapshot(path)
