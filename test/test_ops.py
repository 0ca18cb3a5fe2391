"""Generic OpInfo tests of every moe_ops op.

Upstream's test/test_ops.py is not in the wheel (only torch.testing._internal
is), so this module restates, for our ops, the checks of its classes that
apply to custom ops, against the OpInfos of every family (test/opinfo*.py):

* TestCommon: the claimed dtypes are the dtypes that work, forward and
  backward (test_dtypes); samples are well formed: the requested dtype used
  (test_samples_use_the_dtype), gradients asked for on leaves only
  (test_samples_require_grad_on_leaves), no tensor shared between samples
  (test_samples_own_their_tensors); the float64 reference (test_reference);
  non-contiguous samples give the contiguous results and gradients
  (test_noncontiguous_samples); the same bits run after run
  (test_deterministic); torch.library.opcheck (test_opcheck); gradients
  against finite differences (test_gradcheck); error inputs raise in eager and fake mode
  (test_errors); out= exactly when the schema has an out overload (test_out);
  the public wrapper of an op gives the op's results (test_variant_consistency);
  no input written, no output aliasing an input
  (test_no_input_mutation_or_aliasing).
* TestCompositeCompliance: the backward formulas (register_autograd, Python)
  on tensor subclasses (test_backward_on_subclasses); copy-on-write inputs are
  neither written nor materialised (test_cow_input). Upstream's test_operator
  does not apply: every op is a backend kernel, so no op of ours runs on a
  subclass.
* TestMathBits: negative and conjugate views as inputs, forward and backward.
* TestFakeTensor: fake kernels against eager, with static and with dynamic
  shapes, and every op the forward and backward dispatch (CrossRefFakeMode).
* TestTags: the promises of the tags an op carries or lacks (test_tags).

and every op users call has an OpInfo (test_every_op_has_an_opinfo).

Error inputs named "*_values" need tensor values (offsets, indices): the
kernels check them, fake kernels cannot.

The family files (test_grouped_mm.py, test_routing.py, ...) keep what is op
specific: values in every dtype against the references with derived
tolerances, compile, thread counts, hypothesis properties.
"""


import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.fake_utils import CrossRefFakeMode
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
    free_unbacked_symbols,
)
from torch.testing._internal import composite_compliance
from torch.testing._internal.common_device_type import OpDTypes, ops
from torch.testing._internal.common_dtype import all_types_and_complex_and, floating_and_complex_types_and
from torch.testing._internal.common_utils import TestCase, noncontiguous_like, run_tests
from torch.testing._internal.opinfo.core import SampleInput
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

import torch_moe_ops
from torch_moe_ops import native_functions

from _device import instantiate_cpu_and_cuda
from common import family_op_db

# Every family's OpInfos (test/opinfo_<family>.py and per-op modules), the families as declared.
op_db = [info for family in native_functions.families() for info in family_op_db(family)]

# Every dtype torch.testing.make_tensor creates, and float8_e8m0fnu (MX scales).
ALL_DTYPES = all_types_and_complex_and(
    torch.bool, torch.float16, torch.bfloat16, torch.complex32, torch.bcomplex32, torch.uint16, torch.uint32,
    torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu)
# The dtypes gradients are asked for in (upstream's choice; OpInfo.supported_backward_dtypes is within them).
GRAD_DTYPES = floating_and_complex_types_and(torch.float16, torch.bfloat16, torch.complex32)

# Ops without an OpInfo: the backward ops (backward_of in the declaration).
INTERNAL_OPS = {op.qualname: f"{op.backward_of}'s backward ({op.ops_module})"
                for op in native_functions.ops() if op.backward_of is not None}


def _samples(op, device, dtype, requires_grad=False):
    """The op's samples, from a fixed seed. op.sample_inputs would do the same
    but walks the Python stack with inspect.stack() on every call (tens of
    milliseconds; these tests make several hundred calls)."""
    torch.manual_seed(0)
    return list(op.sample_inputs_func(op, device, dtype, requires_grad))


def _call(op, s):
    return op(s.input, *s.args, **s.kwargs)


def _tensors(s):
    return [t for t in tree_leaves((s.input, s.args, s.kwargs)) if isinstance(t, torch.Tensor)]


def _outputs(out):
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _map(s, fn):
    """The sample with fn applied to each of its tensors (SampleInput.transform
    also maps the dtypes the samples pass, and runs without grad)."""
    inp, args, kwargs = tree_map_only(torch.Tensor, fn, (s.input, s.args, s.kwargs))
    return SampleInput(inp, args=args, kwargs=kwargs, output_process_fn_grad=s.output_process_fn_grad, name=s.name)


def _leaves_requiring_grad(s):
    return [t for t in _tensors(s) if t.requires_grad]


def _grads(out, s, grads=None):
    """Gradients of the sample's differentiable outputs (with grads, or ones)
    w.r.t. its tensors that require grad, each of which must get one (a test
    comparing a missing gradient with another checks nothing)."""
    outs = [o for o in _outputs(s.output_process_fn_grad(out)) if o.requires_grad]
    grads = grads if grads is not None else [torch.ones_like(o) for o in outs]
    return torch.autograd.grad(outs, _leaves_requiring_grad(s), grads)


def _with_grad(op, device, dtype):
    return dtype in op.supported_backward_dtypes(torch.device(device).type)


class TestMoEOps(TestCase):
    exact_dtype = True

    # ------------------------------------------------------------ TestCommon

    @ops(op_db, dtypes=OpDTypes.none)
    def test_dtypes(self, device, op):
        """Runs the samples in every dtype: those that run must be the claimed
        dtypes, forward and backward. A dtype whose samples partly run is a
        failure either way."""
        works, fails = set(), set()
        backward_works, backward_fails = set(), set()
        for dtype in ALL_DTYPES:
            requires_grad = op.supports_autograd and dtype in GRAD_DTYPES
            try:
                samples = _samples(op, device, dtype, requires_grad=requires_grad)
            except Exception:  # a dtype the samples cannot be made in is one the op does not take
                fails.add(dtype)
                continue
            for s in samples:
                try:
                    out = _call(op, s)
                except Exception:
                    fails.add(dtype)
                    continue
                works.add(dtype)
                if not requires_grad:
                    continue
                try:
                    _grads(out, s)
                    backward_works.add(dtype)
                except Exception:
                    backward_fails.add(dtype)
        device_type = torch.device(device).type
        claimed, claimed_backward = set(op.supported_dtypes(device_type)), op.supported_backward_dtypes(device_type)
        self.assertEqual(
            dict(unclaimed=works - fails - claimed, claimed_failing=claimed & fails, partial=works & fails),
            dict(unclaimed=set(), claimed_failing=set(), partial=set()), msg=f"{op.name}: forward dtypes")
        self.assertEqual(
            dict(unclaimed=backward_works - backward_fails - claimed_backward,
                 claimed_failing=claimed_backward & (backward_fails | fails), partial=backward_works & backward_fails),
            dict(unclaimed=set(), claimed_failing=set(), partial=set()), msg=f"{op.name}: backward dtypes")

    @ops(op_db)
    def test_samples_use_the_dtype(self, device, dtype, op):
        """Each sample has an input (or an out_dtype) of the dtype asked for, so
        that the claimed dtypes are what runs."""
        for s in _samples(op, device, dtype):
            dtypes = {t.dtype for t in _tensors(s)} | {v for v in tree_leaves((s.args, s.kwargs))
                                                      if isinstance(v, torch.dtype)}
            self.assertIn(dtype, dtypes, msg=f"{op.name} {s.name}: no input of the requested dtype")

    @ops(op_db)
    def test_samples_require_grad_on_leaves(self, device, dtype, op):
        """Gradients are asked for exactly when requested, and on leaves that
        gradients reach. A view of a tensor that requires grad is not one: made
        in grad mode it is not a leaf; made under no_grad, as OpInfo runs the
        sample functions, it looks like a leaf but no gradient ever reaches it,
        so the gradient tests compare nothing for it."""
        for requires_grad in (False, True) if _with_grad(op, device, dtype) else (False,):
            for s in _samples(op, device, dtype, requires_grad=requires_grad):
                grad = [t for t in _tensors(s) if t.requires_grad]
                self.assertEqual(bool(grad), requires_grad, msg=f"{op.name} {s.name}: requires_grad={requires_grad}")
                for t in grad:
                    reached, = torch.autograd.grad(t * 1, t, torch.ones_like(t), allow_unused=True)
                    self.assertTrue(t.is_leaf and reached is not None,
                                    msg=f"{op.name} {s.name}: gradients do not reach a {list(t.shape)} input that "
                                        "requires grad (a view of a tensor that requires grad?)")

    @ops(op_db)
    def test_samples_own_their_tensors(self, device, dtype, op):
        """No tensor, nor storage, is shared between samples: a test that writes
        into one sample's tensors, or accumulates gradients into them, would
        change the next."""
        for requires_grad in (False, True) if _with_grad(op, device, dtype) else (False,):
            owner = {}
            for i, s in enumerate(_samples(op, device, dtype, requires_grad=requires_grad)):
                for t in _tensors(s):
                    keys = [("tensor", id(t))]
                    if t.untyped_storage().nbytes():
                        keys.append(("storage", t.untyped_storage().data_ptr()))
                    for key in keys:
                        first = owner.setdefault(key, (i, s.name))
                        self.assertEqual(first[0], i, msg=f"{op.name}: {s.name} shares a {key[0]} with {first[1]}")

    @ops([op for op in op_db if op.ref is not None], allowed_dtypes=(torch.float64, torch.long, torch.complex128))
    def test_reference(self, device, dtype, op):
        for s in op.reference_inputs(device, dtype):
            # float64 kernels and references differ only in summation order:
            # sums of at most a few hundred O(1) terms, below 1e-13; a wrong
            # element is off by a term's size.
            self.assertEqual(_call(op, s), op.ref(s.input, *s.args, **s.kwargs), rtol=1e-10, atol=1e-10,
                             msg=s.name)

    @ops(op_db, allowed_dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu))
    def test_deterministic(self, device, dtype, op):
        """The same inputs give the same bits, run after run."""
        for s in _samples(op, device, dtype):
            first = _outputs(_call(op, s))
            self.assertEqual([_bytes(t) for t in _outputs(_call(op, s))], [_bytes(t) for t in first], atol=0,
                             rtol=0, msg=s.name)

    @ops(op_db, allowed_dtypes=(torch.float32, torch.bfloat16, torch.float8_e8m0fnu))
    def test_opcheck(self, device, dtype, op):
        """torch.library.opcheck on every sample, with and without gradients:
        schema (no input written, no undeclared aliasing), fake kernel,
        autograd registration, AOT dispatch with dynamic shapes. opcheck's
        schema check compares inputs with ops that have no float8 kernels:
        for samples with float8 inputs the bytes are compared here instead."""
        checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        grads = (False, True) if op.supports_autograd and _with_grad(op, device, dtype) else (False,)
        for requires_grad in grads:
            for s in _samples(op, device, dtype, requires_grad=requires_grad):
                has_fp8 = any(t.dtype.is_floating_point and t.dtype.itemsize == 1 for t in _tensors(s))
                before = [_bytes(t).clone() for t in _tensors(s)]
                torch.library.opcheck(op.op, (s.input, *s.args), s.kwargs,
                                      test_utils=checks if has_fp8 else ("test_schema",) + checks)
                for a, b in zip(before, [_bytes(t) for t in _tensors(s)], strict=True):
                    self.assertTrue(torch.equal(a, b), msg=f"{s.name}: an input was modified")

    @ops([op for op in op_db if op.supports_autograd], allowed_dtypes=(torch.float64,))
    def test_gradcheck(self, device, dtype, op):
        """Every sample's float64 inputs that take a gradient, against finite
        differences (through the OpInfo's gradcheck_wrapper: router_topk's
        breaks the ties its samples make on purpose). A float32 input beside
        them (unpermute's float32 routing weights) cannot pass a float64
        finite-difference check: its gradient is compared with the float64
        reference's instead."""
        checked = 0
        for s in _samples(op, device, dtype, requires_grad=True):
            leaves = _leaves_requiring_grad(s)
            for leaf in (t for t in leaves if t.dtype != torch.float64):
                self._check_float32_leaf_grad(op, s, leaf)
            leaves = [t for t in leaves if t.dtype == torch.float64]
            if not leaves:
                continue
            checked += 1

            def fn(*ts, s=s, leaves=leaves):
                swap = {id(a): b for a, b in zip(leaves, ts)}
                inp, args, kwargs = tree_map_only(torch.Tensor, lambda v: swap.get(id(v), v),
                                                  (s.input, s.args, s.kwargs))
                out = op.gradcheck_wrapper(op, inp, *args, **kwargs)
                return tuple(o for o in _outputs(s.output_process_fn_grad(out)) if o.requires_grad)

            # Detached leaves with the samples' strides (some samples are views).
            inputs = tuple(t.detach().requires_grad_() for t in leaves)
            # The full Jacobian costs two calls per input element: past a few
            # hundred elements, fast mode's random projections of it (upstream's
            # gradcheck_fast_mode) check the same formulas in a few calls.
            fast = sum(t.numel() for t in inputs) > 256
            self.assertTrue(torch.autograd.gradcheck(fn, inputs, fast_mode=fast), msg=s.name)
        self.assertGreater(checked, 0, msg=f"{op.name}: no sample was gradchecked")

    def _check_float32_leaf_grad(self, op, s, leaf):
        """The gradient of a float32 input beside float64 ones, against the
        reference run with that input in float64: the kernel accumulates in
        float64 and rounds once to float32 (2^-24 relative; 1e-300 absolute
        for exact zeros)."""
        self.assertEqual(leaf.dtype, torch.float32, msg=s.name)

        def grad(fn, cast):
            x = cast(leaf).detach().requires_grad_()
            inp, args, kwargs = tree_map_only(torch.Tensor, lambda v: x if v is leaf else v,
                                              (s.input, s.args, s.kwargs))
            outs = [o for o in _outputs(fn(inp, *args, **kwargs)) if o.is_floating_point() and o.requires_grad]
            return torch.autograd.grad(outs, x, [torch.ones_like(o) for o in outs])[0]

        ours, ref = grad(op, lambda t: t), grad(op.ref, lambda t: t.double())
        self.assertEqual(ours.dtype, torch.float32, msg=s.name)
        self.assertEqual(ours.double(), ref, rtol=2**-24, atol=1e-300, msg=s.name)

    @ops(op_db, allowed_dtypes=(torch.float32, torch.long, torch.complex64))
    def test_noncontiguous_samples(self, device, dtype, op):
        """Every input made non-contiguous (index tensors and scales too): the
        same bits and the same gradients, for a non-contiguous incoming
        gradient."""
        with_grad = _with_grad(op, device, dtype)
        for s in _samples(op, device, dtype, requires_grad=with_grad):
            n = s.noncontiguous()
            expected, actual = _call(op, s), _call(op, n)
            # Kernels read any strides; their arithmetic does not depend on them.
            self.assertEqual(actual, expected, atol=0, rtol=0, msg=s.name)
            if not with_grad:
                continue
            outs = [o for o in _outputs(s.output_process_fn_grad(expected)) if o.requires_grad]
            grads = [torch.randn_like(o) for o in outs]
            # Not bitwise: aten's reductions in the backward formulas (the bias
            # gradients) sum in an order that follows the strides; float32
            # sums of at most a few dozen terms stay within assertEqual's
            # float32 default (1.3e-6 relative).
            self.assertEqual(_grads(actual, n, [noncontiguous_like(g) for g in grads]), _grads(expected, s, grads),
                             msg=s.name)

    @ops([op for op in op_db if op.error_inputs_func is not None], dtypes=OpDTypes.none)
    def test_errors(self, device, op):
        for ei in op.error_inputs(device):
            s = ei.sample_input
            with self.assertRaisesRegex(ei.error_type, ei.error_regex, msg=s.name):
                _call(op, s)
            with FakeTensorMode() as mode:
                fake = _map(s, mode.from_tensor)
                if s.name.endswith("_values"):
                    # A bad value in an index tensor: fake kernels see shapes,
                    # not values, and must accept what is well-shaped.
                    _call(op, fake)
                    continue
                with self.assertRaisesRegex(ei.error_type, ei.error_regex, msg=s.name):
                    _call(op, fake)

    @ops(op_db, dtypes=OpDTypes.any_one)
    def test_out(self, device, dtype, op):
        """supports_out is the schema's: an out overload, or out= refused."""
        packet = getattr(torch.ops.moe_ops, op.op._schema.name.split("::")[1])
        self.assertEqual(op.supports_out, "out" in packet.overloads())
        if not op.supports_out:
            s = _samples(op, device, dtype)[0]
            # The dispatcher's refusal: the keyword by name, or, when the
            # positional arguments already fill the schema, the count.
            with self.assertRaisesRegex((TypeError, RuntimeError),
                                        r"keyword argument 'out'|expected at most \d+ argument\(s\) but received"):
                op(s.input, *s.args, out=_outputs(_call(op, s))[0], **s.kwargs)

    @ops([op for op in op_db if hasattr(torch_moe_ops, op.name.split(".")[-1])], dtypes=OpDTypes.any_one)
    def test_variant_consistency(self, device, dtype, op):
        """The public wrapper (torch_moe_ops.<name>) passes every argument
        through: the op's bits and gradients."""
        wrapper = getattr(torch_moe_ops, op.name.split(".")[-1])
        with_grad = _with_grad(op, device, dtype)
        for s in _samples(op, device, dtype, requires_grad=with_grad):
            expected, actual = _call(op, s), _call(wrapper, s)
            self.assertEqual(actual, expected, atol=0, rtol=0, msg=s.name)
            if with_grad:
                self.assertEqual(_grads(actual, s), _grads(expected, s), atol=0, rtol=0, msg=s.name)

    @ops(op_db, dtypes=OpDTypes.any_one)
    def test_no_input_mutation_or_aliasing(self, device, dtype, op):
        """No schema marks an input as written or an output as aliased: the
        bytes, metadata and version counter of every input stay as they were
        through forward and backward, and no output shares an input's storage."""
        with_grad = _with_grad(op, device, dtype)
        for s in _samples(op, device, dtype, requires_grad=with_grad):
            tensors = _tensors(s)
            before = [(_bytes(t).clone(), t.shape, t.stride(), t.storage_offset(), t._version) for t in tensors]
            out = _call(op, s)
            if with_grad:
                _grads(out, s)
            after = [(_bytes(t), t.shape, t.stride(), t.storage_offset(), t._version) for t in tensors]
            self.assertEqual(after, before, atol=0, rtol=0, msg=s.name)
            inputs = {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes()}
            for o in _outputs(out):
                self.assertFalse(o.untyped_storage().nbytes() and o.untyped_storage().data_ptr() in inputs,
                                 msg=f"{s.name}: an output aliases an input")

    # ------------------------------------------------ TestCompositeCompliance

    @ops([op for op in op_db if op.supports_autograd], allowed_dtypes=(torch.float32,))
    def test_backward_on_subclasses(self, device, dtype, op):
        """The backward formulas are Python compositions: run them with inputs
        and incoming gradients as tensor subclasses (CompositeCompliantTensor),
        which refuse what subclasses cannot follow (in-place writes of a
        subclass into a plain tensor, .item(), resize_, storage access).
        Upstream tries all 2^n ways of wrapping the n input tensors; a
        violation needs one wrapped tensor reaching a plain one, so none, all
        and each alone are tried here (expert_mlp has up to nine), each with
        the incoming gradients plain and wrapped."""
        # The helper takes ops named like aten's views for views (it would
        # re-alias moe_ops.permute's outputs as aten.permute's); the backward
        # runs without grad mode, so no view needs the aliasing.
        cct, mode = composite_compliance.generate_cct_and_mode(autograd_view_consistency=False)
        for s in _samples(op, device, dtype, requires_grad=True):
            flat, spec = tree_flatten((s.input, s.args, s.kwargs))
            tensors = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
            out = _call(op, s)
            outs = [o for o in _outputs(s.output_process_fn_grad(out)) if o.requires_grad]
            expected = _grads(out, s)

            def grads(wrap_args, wrap_grads):
                args = [cct(a, mode) if i in wrap_args else a for i, a in enumerate(flat)]
                inp, a, kw = tree_unflatten(args, spec)
                out = [o for o in _outputs(s.output_process_fn_grad(op(inp, *a, **kw))) if o.requires_grad]
                ones = [torch.ones(o.shape, dtype=o.dtype, device=o.device) for o in out]
                incoming = [cct(g, mode) if j in wrap_grads else g for j, g in enumerate(ones)]
                leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
                got = torch.autograd.grad(out, leaves, incoming, allow_unused=True)
                return [g.elem if isinstance(g, cct) else g for g in got]

            for wrap_args in [set(), set(tensors)] + [{i} for i in tensors]:
                for wrap_grads in (set(), set(range(len(outs)))):
                    if wrap_args or wrap_grads:
                        self.assertEqual(grads(wrap_args, wrap_grads), expected, atol=0, rtol=0,
                                         msg=f"{s.name}: args {sorted(wrap_args)}, grads {sorted(wrap_grads)}")

    @ops(op_db, dtypes=OpDTypes.any_one)
    def test_cow_input(self, device, dtype, op):
        """Inputs as lazy (copy-on-write) clones stay lazy through forward and
        backward: kernels read inputs through const pointers and never write
        them."""
        with_grad = _with_grad(op, device, dtype)
        for s in _samples(op, device, dtype, requires_grad=with_grad):
            cow = _map(s, lambda t: torch._lazy_clone(t.detach()).requires_grad_(t.requires_grad))
            out = _call(op, cow)
            if with_grad and _leaves_requiring_grad(cow):
                _grads(out, cow)
            for t in _tensors(cow):
                self.assertTrue(torch._C._is_cow_tensor(t), msg=f"{s.name}: a {list(t.shape)} input was materialised")
            self.assertEqual(_tensors(cow), _tensors(s), atol=0, rtol=0, equal_nan=True, msg=s.name)

    # ------------------------------------------------------------ TestMathBits

    def _check_math_view(self, device, dtype, op, physical, view, is_set):
        """Every floating input as a view with a math bit set (values equal to
        the sample's): the sample's outputs and gradients."""
        with_grad = _with_grad(op, device, dtype)
        for s in _samples(op, device, dtype, requires_grad=with_grad):
            def as_view(t):
                if not (t.is_floating_point() or t.is_complex()):
                    return t
                with torch.no_grad():
                    v = view(physical(t))
                self.assertTrue(is_set(v))
                return v.requires_grad_(t.requires_grad)

            v = _map(s, as_view)
            expected, actual = _call(op, s), _call(op, v)
            self.assertEqual(actual, expected, atol=0, rtol=0, msg=s.name)
            if with_grad:
                outs = [o for o in _outputs(s.output_process_fn_grad(expected)) if o.requires_grad]
                grads = [torch.randn_like(o) for o in outs]
                self.assertEqual(_grads(actual, v, grads), _grads(expected, s, grads), atol=0, rtol=0, msg=s.name)

    @ops(op_db, allowed_dtypes=(torch.float64,))
    def test_neg_view(self, device, dtype, op):
        self._check_math_view(device, dtype, op, torch.neg, torch._neg_view, torch.Tensor.is_neg)

    @ops(op_db, allowed_dtypes=(torch.complex64,))
    def test_conj_view(self, device, dtype, op):
        self._check_math_view(device, dtype, op, torch.conj_physical, torch.conj, torch.Tensor.is_conj)

    @ops(op_db, allowed_dtypes=(torch.complex128,))
    def test_neg_conj_view(self, device, dtype, op):
        self._check_math_view(device, dtype, op, lambda t: torch.neg(torch.conj_physical(t)),
                              lambda t: torch._neg_view(t).conj(), lambda t: t.is_neg() and t.is_conj())

    # ---------------------------------------------------------- TestFakeTensor

    def _assert_like_eager(self, fake, eager, msg, hint=lambda x: x):
        self.assertEqual(len(fake), len(eager), msg=msg)
        for f, e in zip(fake, eager):
            self.assertEqual((tuple(hint(d) for d in f.shape), tuple(hint(d) for d in f.stride()),
                              hint(f.storage_offset()), f.dtype, f.device),
                             (tuple(e.shape), e.stride(), e.storage_offset(), e.dtype, e.device), msg=msg)

    @ops(op_db)
    def test_fake(self, device, dtype, op):
        """The fake kernel gives eager's shapes, strides, dtypes and devices."""
        for s in _samples(op, device, dtype):
            eager = _outputs(_call(op, s))
            with FakeTensorMode() as mode:
                fake = _outputs(_call(op, _map(s, mode.from_tensor)))
            self._assert_like_eager(fake, eager, s.name)

    @ops(op_db, dtypes=OpDTypes.any_one)
    def test_fake_dynamic_shapes(self, device, dtype, op):
        """Every size symbolic (as torch.compile(dynamic=True) traces): the fake
        kernel's symbolic outputs evaluate to eager's; no output size is an
        unbacked (data-dependent) symbol."""
        for s in _samples(op, device, dtype):
            eager = _outputs(_call(op, s))
            mode = FakeTensorMode(shape_env=ShapeEnv())
            dynamic = _map(s, lambda t: mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())))
            with mode:
                fake = _outputs(_call(op, dynamic))
            for f in fake:
                self.assertFalse(free_unbacked_symbols(f), msg=f"{s.name}: data-dependent output sizes")
            self._assert_like_eager(fake, eager, s.name, hint=int)

    @ops([op for op in op_db if op.supports_autograd], allowed_dtypes=(torch.float32,))
    def test_fake_crossref_backward(self, device, dtype, op):
        """Forward and backward under CrossRefFakeMode: every op dispatched, the
        internal backward ops included, is run on fake copies of its inputs and
        must give the eager outputs' metadata and aliasing."""
        skip = {torch.ops.aten.detach.default, torch.ops.aten.empty_strided.default, torch.ops.aten.copy_.default,
                torch.ops.aten.is_same_size.default}
        for s in _samples(op, device, dtype, requires_grad=True):
            with CrossRefFakeMode(ignore_op_fn=lambda fn: fn in skip):
                _grads(_call(op, s), s)

    # --------------------------------------------------------------- TestTags

    @ops(op_db, dtypes=OpDTypes.any_one)
    def test_tags(self, device, dtype, op):
        """The compiler reads an op's tags; ours carry none, which promises:
        no nondeterministic_seeded / nondeterministic_bitwise, so the same
        inputs give the same bits (checked here); no dynamic_output_shape or
        data_dependent_output, so sizes follow from sizes
        (test_fake_dynamic_shapes); no inplace / inplace_view
        (test_no_input_mutation_or_aliasing). An op given a tag fails here
        until the tag's promise is checked."""
        self.assertEqual(op.op.tags, [], msg=f"{op.name}: a tag without a check here")
        for s in _samples(op, device, dtype):
            first = _outputs(_call(op, s))
            self.assertEqual([_bytes(t) for t in _outputs(_call(op, s))], [_bytes(t) for t in first], atol=0, rtol=0,
                             msg=f"{s.name}: not bitwise deterministic")

    # ---------------------------------------------------------------- coverage

    def test_every_op_has_an_opinfo(self, device):
        """Every moe_ops op has an OpInfo but the internal backward ops, and
        those are reached by a gradient of an op that has one (so the gradient
        tests above run their kernels and fake kernels)."""
        names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops::")}
        covered = {op.op._schema.name for op in op_db}
        self.assertEqual(names - covered, set(INTERNAL_OPS))

        reached = set()

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                reached.add(func._schema.name)
                return func(*args, **(kwargs or {}))

        for op in op_db:
            if op.supports_autograd:
                s = _samples(op, device, torch.float32, requires_grad=True)[0]
                with Record():
                    _grads(_call(op, s), s)
        self.assertEqual(set(INTERNAL_OPS) - reached, set())


instantiate_cpu_and_cuda(TestMoEOps, globals(), gpu_adds=(
    "the generic OpInfo checks on CUDA tensors: every CUDA kernel, device-side asserts instead of the "
    "\"*_values\" errors"))


if __name__ == "__main__":
    run_tests()
