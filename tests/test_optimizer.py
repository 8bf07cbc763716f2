import math

import pytest
import torch

from config import Config
from model import Transformer
from optimizer import EarlyStopping, LRSchedule, Muon, build_optimizers, lr_multiplier, orthogonalize


def _run_both(ns_dtype, shapes=((64, 32), (32, 96), (48, 48)), steps=4, **hyper):
    torch.manual_seed(0)
    ours_params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = Muon(ours_params, ns_dtype=ns_dtype, **hyper)
    theirs = torch.optim.Muon(theirs_params, **hyper)
    for _ in range(steps):
        grads = [torch.randn(*s) for s in shapes]
        for p, q, g in zip(ours_params, theirs_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    return [p.detach() for p in ours_params], [q.detach() for q in theirs_params]


# Ours orthogonalises matrices of one shape (up to a transpose) as one batch; the second set has
# repeated and transposed shapes, as a transformer's blocks do.
@pytest.mark.parametrize("shapes", [((64, 32), (32, 96), (48, 48)),
                                    ((64, 32), (32, 64), (64, 32), (48, 48), (48, 48), (32, 96))])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_optim_muon_in_bf16(nesterov, shapes):
    # torch.optim.Muon runs Newton–Schulz in bf16; in the same dtype ours gives the same update, up
    # to bf16's rounding (8 bits: a batched matmul may sum in another order than torch's one matrix
    # at a time, and CPUs differ in how they round). A wrong shape factor, momentum or decay would
    # be off by tens of percent; 2 % of the update is a few bf16 roundings.
    hyper = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    ours, theirs = _run_both(torch.bfloat16, shapes=shapes, **hyper)
    start = _run_both(torch.bfloat16, shapes=shapes, steps=0, **hyper)[0]
    for p, q, p0 in zip(ours, theirs, start):
        assert (p - q).abs().max() <= 0.02 * (q - p0).abs().max()


def textbook_muon(params, grads_per_step, lr, momentum, weight_decay, nesterov=True):
    """Muon as torch.optim.Muon's documentation writes it, one matrix at a time, in float64: the
    independent reference for ours. Returns the parameters after every step's gradients."""
    params = [p.double().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            buffers[i] = momentum * buffers[i] + (1 - momentum) * g
            update = momentum * buffers[i] + (1 - momentum) * g if nesterov else buffers[i]
            x = update.T if update.shape[0] > update.shape[1] else update
            x = x / max(float(x.norm()), 1e-7)
            for _ in range(5):  # the quintic Newton–Schulz iteration, coefficients (3.4445, -4.7750, 2.0315)
                gram = x @ x.T
                x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
            x = x.T if update.shape[0] > update.shape[1] else x
            p.mul_(1 - lr * weight_decay).add_(x * math.sqrt(max(1.0, p.shape[0] / p.shape[1])), alpha=-lr)
    return params


def test_muon_fp32_is_the_same_update_more_precisely():
    """Ours with Newton–Schulz in float32 (the CPU default) against the textbook update in float64:
    apart by float32's rounding of the parameters at each step (measured 7.1e-7 at most, within four steps of
    twice float32's epsilon times the largest parameter), where torch.optim.Muon's bf16 Newton–Schulz
    is off by more than ten times that (measured 2.6e-4 to 3.5e-4)."""
    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    ours, theirs = _run_both(torch.float32, **hyper)
    start = _run_both(torch.float32, steps=0)[0]
    torch.manual_seed(0)  # the parameters and gradients _run_both draws
    shapes = ((64, 32), (32, 96), (48, 48))
    initial = [torch.randn(*s) for s in shapes]
    exact = textbook_muon(initial, [[torch.randn(*s) for s in shapes] for _ in range(4)], **hyper)
    for p, q, p64, p0 in zip(ours, theirs, exact, start):
        rounding = 4 * 2 * torch.finfo(torch.float32).eps * p64.abs().max()
        ours_error, bf16_error = (p.double() - p64).abs().max(), (q.double() - p64).abs().max()
        assert ours_error <= rounding, (ours_error, rounding)
        assert bf16_error > 10 * rounding, (bf16_error, rounding)
        assert (p64 - p0.double()).abs().max() > 100 * rounding  # the parameters did move


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    tall = torch.randn(128, 32) * torch.logspace(0, 2, 32)  # singular values spread over 100x
    for matrix in (tall, tall.T):
        assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 50
        singular = torch.linalg.svdvals(orthogonalize(matrix))
        assert singular.max() < 1.21 and singular.min() > 0.65  # measured [0.68, 1.196]: the [0.7, 1.2] it promises


def test_orthogonalize_a_stack_is_each_matrix_on_its_own():
    torch.manual_seed(0)
    stack = torch.randn(5, 24, 40)
    batched = orthogonalize(stack)
    for i in range(5):
        assert torch.allclose(batched[i], orthogonalize(stack[i]), atol=1e-5)
    assert torch.allclose(orthogonalize(stack.mT), batched.mT, atol=1e-5)  # tall ones too


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_parameter_groups():
    cfg = Config(num_blocks=2, norm="layernorm", attention_sink=True, tie_embeddings=False, use_muon=True)
    model = Transformer(cfg, 20)
    adamw, muon = build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {f"blocks.{i}.{m}" for i in range(2)
                          for m in ("attn.qkv.weight", "attn.out.weight", "mlp.fc_in.weight", "mlp.fc_out.weight")}
    decay, no_decay = adamw.param_groups
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay_names == {"embed.weight", "pos_embed.weight", "unembed.weight"}
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.sink" in no_decay_names and "blocks.1.ln1.norm.weight" in no_decay_names
    counted = sum(len(g["params"]) for o in (adamw, muon) for g in o.param_groups)
    assert counted == len(list(model.parameters()))  # every parameter exactly once


def test_adamw_only_and_decay_all():
    cfg = Config(use_muon=False, decay_all_params=True, tie_embeddings=True)
    (adamw,) = build_optimizers(Transformer(cfg, 20), cfg)
    assert len(adamw.param_groups) == 1 and adamw.param_groups[0]["weight_decay"] == cfg.weight_decay


def test_schedules():
    cfg = Config(warmup_steps=10, lr_schedule="cosine", min_lr_frac=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.55)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    cfg.lr_schedule = "linear"
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.55)
    assert lr_multiplier(35, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.75)
    cfg.lr_schedule = "constant"
    assert lr_multiplier(100, cfg, 110) == 1.0


def test_early_stopping():
    target = EarlyStopping(target_val_acc=0.99)
    assert not target.update(1.0, 0.5) and target.update(2.0, 0.995)
    assert "0.995" in target.reason
    patient = EarlyStopping(patience=2, min_delta=0.1)
    assert not patient.update(1.0, None)
    assert not patient.update(0.95, None)  # improvement below min_delta: counts as bad
    assert patient.update(0.97, None)
    resumed = EarlyStopping(patience=2, min_delta=0.1)
    resumed.load_state_dict(EarlyStopping(patience=2).state_dict() | {"best_loss": 1.0, "bad_evals": 1})
    assert resumed.update(1.0, None)
    assert math.isinf(EarlyStopping().best_loss)


def test_grokfast_ignores_an_overflowed_step():
    from optimizer import GrokfastEMA

    p = torch.nn.Parameter(torch.zeros(3))
    grokfast = GrokfastEMA([p], alpha=0.9, lamb=2.0)
    p.grad = torch.ones(3)
    grokfast.apply()
    assert torch.equal(p.grad, torch.full((3,), 3.0))  # g + 2 * EMA, the EMA starting at g
    p.grad = torch.tensor([1.0, float("inf"), 1.0])  # what an fp16 overflow looks like after unscale
    grokfast.apply()
    assert torch.equal(grokfast.averages[0], torch.ones(3))  # the average is untouched
    p.grad = torch.ones(3)
    grokfast.apply()
    assert torch.isfinite(p.grad).all()


def test_loaded_optimizer_state_keeps_todays_hyperparameters():
    from optimizer import load_optimizer_states

    cfg = Config(use_muon=True)
    model = Transformer(cfg, 20)
    old = build_optimizers(model, cfg)
    model(torch.randint(0, 20, (2, 3))).sum().backward()
    for optimizer in old:
        optimizer.step()
    cfg.lr, cfg.muon_lr, cfg.weight_decay = 1e-4, 0.01, 0.0
    new = build_optimizers(model, cfg)
    load_optimizer_states(new, [o.state_dict() for o in old])
    adamw, muon = new
    assert adamw.param_groups[0]["initial_lr"] == 1e-4 and adamw.param_groups[0]["weight_decay"] == 0.0
    assert muon.param_groups[0]["initial_lr"] == 0.01
    assert adamw.state[adamw.param_groups[0]["params"][0]]["step"] == 1  # moments came back
    with pytest.raises(ValueError, match="optimizers"):
        load_optimizer_states(new[:1], [o.state_dict() for o in old])


def test_the_plateau_schedule_cuts_the_lr_when_the_eval_loss_stalls_and_resumes_where_it_was():
    cfg = Config(lr_schedule="plateau", warmup_steps=2, plateau_factor=0.5, plateau_patience=2, min_delta=0.01,
                 min_lr_frac=0.2).validate()
    schedule = LRSchedule(cfg, max_steps=100)
    assert [schedule(step) for step in (0, 1, 2, 50)] == [0.5, 1.0, 1.0, 1.0]  # warm-up, then flat
    cuts = [schedule.observe(loss) for loss in (1.0, 0.9, 0.895, 0.899)]  # 0.895 improves by less than min_delta
    assert cuts == [False, False, False, True] and schedule(50) == 0.5
    resumed = LRSchedule(cfg, max_steps=100)
    resumed.load_state_dict(schedule.state_dict())
    for loss in (0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85):  # an improvement resets the count
        assert resumed.observe(loss) == schedule.observe(loss)
    assert resumed(50) == schedule(50) == 0.2  # 0.5 -> 0.25 -> the floor, min_lr_frac
    assert not schedule.observe(0.85) and schedule(50) == 0.2
    other = LRSchedule(Config(lr_schedule="cosine").validate(), max_steps=100)
    assert not any(other.observe(1.0) for _ in range(10)) and other.factor == 1.0  # only plateau cuts


@pytest.mark.parametrize("flag,value", [("plateau_factor", "1"), ("plateau_patience", "0"), ("lr_schedule", "step")])
def test_plateau_settings_are_checked(flag, value):
    from config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=f"--{flag}"):
        parse_config([f"--{flag}", value])
