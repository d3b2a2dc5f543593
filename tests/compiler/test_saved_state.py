"""``--save`` writes exactly the model's own ``state_dict``: no non-persistent buffers (Llama's
``rotary_emb.inv_freq``), no lifted constants; ``load_state_dict(strict=True)`` takes it."""
import pytest
import torch

from ir.parser import parse
from tests.capture_cache import compile_cached
from tests.launch import Program, run_programs, selected_tests, train_eager, training_program
from tests.models import llama_model, lm_inputs

SGD = (torch.optim.SGD, {"lr": 0.1})
STRATEGIES = {"dp2": "dp", "pp2": {"mesh": {"pp": 2}, "microbatches": 2}}


def test_ir_marks_buffers_outside_the_state_dict():
    model = llama_model()
    plan = compile_cached(model, lm_inputs(), cluster=2, strategy="dp")
    graph = parse(plan.ir)
    unsaved = {p.target for p in graph.params if p.kind == "buffer" and not p.persistent}
    assert unsaved == {"lm.model.rotary_emb.inv_freq", "lm.model.rotary_emb.original_inv_freq"}
    assert not unsaved & set(model.state_dict())
    assert str(graph) == plan.ir


def eager_reference(data: list) -> torch.nn.Module:
    """The Llama trained eagerly on ``data`` (one SGD step per batch)."""
    reference = llama_model()
    train_eager(reference, data, len(data), SGD)
    return reference


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """Each strategy's program trained 2 SGD steps, saving its weights; and the dp2 program started from eager's
    trained ``state_dict`` (``--weights``), saving again. All share one torchrun launch: (key -> folder, eager's
    trained model)."""
    data = [lm_inputs(seed=30 + i) for i in range(2)]
    reference = eager_reference(data)
    programs, folders = {}, {}
    for params in selected_tests(request, "test_saved_state_loads_strictly_into_a_fresh_model").values():
        strategy = params["strategy"]
        plan = compile_cached(llama_model(), data[0], cluster=2, strategy=STRATEGIES[strategy], optimizer=SGD)
        folders[strategy] = tmp_path_factory.mktemp(strategy)
        programs[strategy] = training_program(plan, folders[strategy], data, 2)
        if strategy == "dp2":
            torch.save(reference.state_dict(), folders[strategy] / "eager.pt")
            programs["dp2-restart"] = Program(programs[strategy].main, 2, (
                "--steps", "1", "--data", str(folders[strategy] / "data.pt"), "--weights",
                str(folders[strategy] / "eager.pt"), "--save", str(folders[strategy] / "again.pt")))
    results = run_programs(programs)
    for key, result in results.items():
        assert result.returncode == 0, f"{key}: {result.stderr[-4000:]}"
    return folders, reference


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_saved_state_loads_strictly_into_a_fresh_model(runs, strategy):
    folders, reference = runs
    folder = folders[strategy]
    fresh = llama_model(seed=5)
    fresh.load_state_dict(torch.load(folder / "final.pt", weights_only=True), strict=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    if strategy == "dp2":  # a saved state is a starting point too: the buffers it lacks come from the emitted weights
        assert set(torch.load(folder / "again.pt", weights_only=True)) == set(reference.state_dict())
