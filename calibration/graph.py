"""ONNX graph analysis for reduced precision: which nodes may lose precision, which must stay FP32.

The FOD graph has three kinds of compute (see ``docs/calibration.md``):

* the *feature* part (backbone convolutions, token projections, FFN): robust, where the time goes;
  quantized to INT8 / cast to FP16;
* the *sensitive* part: softmax attention, the RBF target (``1 / (2 sigma^2)`` overflows FP16),
  KL divergences (``log(p + 1e-4)``), the softmax over patches, layer-norm statistics; kept FP32;
* the *scoring tail* after the last MatMul: patch score, bilinear upsampling, the 33-tap Gaussian
  smoothing (a Conv with constant weights!) and the max; kept FP32.

The rules below find these parts from the graph structure alone, so they work on any exported
FOD graph (and the toy test graphs) without node-name conventions.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

#: op types whose INT8 Q/DQ TensorRT fuses into INT8 kernels (and ORT runs as QLinear ops)
INT8_OP_TYPES: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
#: linear-algebra ops: the sensitive-region searches stop at them
_COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})
#: ops whose output is a probability / log-domain quantity that must keep FP32 inputs
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
#: ops that pick the nearest bank patch from distances: the nearest-patch search's ArgMin, the regional
#: level's ReduceMin (``fod.model.RegionalLevel``)
_ARG_OPS = frozenset({"ArgMin", "ArgMax", "ReduceMin"})
#: the minimum over a bank that is a score itself (regional and global levels), not an index
_SCORE_MIN_OPS = frozenset({"ReduceMin"})
#: op types kept FP32 in the FP16 variant wherever they occur
FP16_BLOCKED_OPS: tuple[str, ...] = (
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "LayerNormalization",
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "Resize",
    "Upsample",
)
#: how far (in nodes) the search from a MatMul / Conv to a Softmax goes
_MAX_HOPS = 16


@dataclass
class GraphIndex:
    """Producers, consumers and constant tensors of an ONNX graph (top level only).

    Attributes:
        model: the model (node names are filled in by :func:`name_nodes` first).
        producer: tensor name -> index of the node that outputs it.
        consumers: tensor name -> indices of the nodes that read it.
        constants: tensors computable without the graph input (initializers, Constant nodes and
            everything computed from constants only, e.g. a transposed weight).
    """

    model: onnx.ModelProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    constants: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        """Index ``model`` (nodes are assumed topologically sorted, as ONNX requires)."""
        index = cls(model)
        graph = model.graph
        index.constants = {init.name for init in graph.initializer}
        for i, node in enumerate(graph.node):
            for out in node.output:
                index.producer[out] = i
            for inp in node.input:
                if inp:
                    index.consumers[inp].append(i)
            real_inputs = [x for x in node.input if x]
            if node.op_type == "Constant" or (real_inputs and all(x in index.constants for x in real_inputs)):
                index.constants.update(o for o in node.output if o)
        return index

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The graph's nodes, in order."""
        return list(self.model.graph.node)

    def children(self, i: int) -> Iterable[int]:
        """Indices of the nodes that read any output of node ``i``."""
        for out in self.model.graph.node[i].output:
            yield from self.consumers.get(out, [])

    def parents(self, i: int) -> Iterable[int]:
        """Indices of the nodes that produce a non-constant input of node ``i``."""
        for inp in self.model.graph.node[i].input:
            if inp and inp not in self.constants and inp in self.producer:
                yield self.producer[inp]


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name ``<op_type>_<index>`` (quantizers select by name).

    Returns:
        How many nodes were renamed.
    """
    used = {n.name for n in model.graph.node if n.name}
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            renamed += 1
    return renamed


def _reaches(index: GraphIndex, start: int, ops: frozenset[str]) -> bool:
    """True when an op of ``ops`` is reachable from node ``start`` without crossing another compute op."""
    seen = {start}
    queue = deque([(c, 1) for c in index.children(start)])
    while queue:
        i, hops = queue.popleft()
        if i in seen or hops > _MAX_HOPS:
            continue
        seen.add(i)
        op = index.model.graph.node[i].op_type
        if op in ops:
            return True
        if op in _COMPUTE_OPS:
            continue
        queue.extend((c, hops + 1) for c in index.children(i))
    return False


def _fed_by_softmax(index: GraphIndex, start: int, input_pos: int = 0) -> bool:
    """True when input ``input_pos`` of node ``start`` comes from a Softmax through non-compute ops."""
    node = index.model.graph.node[start]
    if input_pos >= len(node.input) or node.input[input_pos] not in index.producer:
        return False
    seen: set[int] = set()
    queue = deque([(index.producer[node.input[input_pos]], 1)])
    while queue:
        i, hops = queue.popleft()
        if i in seen or hops > _MAX_HOPS:
            continue
        seen.add(i)
        op = index.model.graph.node[i].op_type
        if op in _SOFTMAX_OPS:
            return True
        if op in _COMPUTE_OPS:
            continue
        queue.extend((p, hops + 1) for p in index.parents(i))
    return False


def matmul_ancestors(index: GraphIndex) -> set[int]:
    """Indices of nodes that are (or feed, directly or not) a MatMul / Gemm."""
    out: set[int] = set()
    queue = deque(i for i, n in enumerate(index.model.graph.node) if n.op_type in ("MatMul", "Gemm"))
    while queue:
        i = queue.popleft()
        if i in out:
            continue
        out.add(i)
        queue.extend(index.parents(i))
    return out


def scoring_tail(index: GraphIndex) -> set[int]:
    """Indices of the nodes after the last MatMul: they feed no MatMul but descend from one.

    In a graph without MatMul / Gemm there is no tail (empty set).
    """
    feeds = matmul_ancestors(index)
    if not feeds:
        return set()
    descendants: set[int] = set()
    queue = deque(i for i, n in enumerate(index.model.graph.node) if n.op_type in ("MatMul", "Gemm"))
    while queue:
        i = queue.popleft()
        for c in index.children(i):
            if c not in descendants:
                descendants.add(c)
                queue.append(c)
    return {i for i in descendants if i not in feeds}


def last_matmuls(index: GraphIndex) -> set[int]:
    """MatMul / Gemm nodes with no MatMul / Gemm downstream (e.g. each level's reconstruction head)."""
    out = set()
    for i, node in enumerate(index.model.graph.node):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        seen: set[int] = set()
        queue = deque(index.children(i))
        found = False
        while queue and not found:
            j = queue.popleft()
            if j in seen:
                continue
            seen.add(j)
            if index.model.graph.node[j].op_type in ("MatMul", "Gemm"):
                found = True
            queue.extend(index.children(j))
        if not found:
            out.add(i)
    return out


@dataclass(frozen=True)
class Int8Selection:
    """Which nodes get INT8 Q/DQ, and why the others do not.

    Attributes:
        quantize: names of the Conv / MatMul / Gemm nodes to quantize.
        excluded: name -> reason for every Conv / MatMul / Gemm node left in FP32.
    """

    quantize: list[str]
    excluded: dict[str, str]


def select_int8_nodes(model: onnx.ModelProto, *, keep_last_matmul: bool = False, scope: str = "all") -> Int8Selection:
    """Choose the nodes to quantize (call :func:`name_nodes` first).

    Rules, in order (the first that applies excludes a node):

    1. a constant subgraph (all inputs constant): folded anyway;
    2. weight not constant (activation x activation, e.g. Q K^T): attention maps stay FP32;
    3. in the scoring tail (after the last MatMul; e.g. the Gaussian smoothing Conv);
    4. a fixed one-channel filter (a Conv whose weight has one output and one input channel: the
       flat-field blur of the input conditioning, ``fod.intensity``): it divides the frame, where
       INT8 rounding of the illumination would show up as texture;
    5. the input comes from a Softmax (attention x values);
    6. the output reaches a Softmax without another compute op between (attention logits with
       folded reference keys, the sigma projection of the RBF target);
    7. the output reaches an ArgMin / ArgMax / ReduceMin without another compute op between: the
       distances of the nearest-patch search (``FODLevel.nearest``), where INT8 rounding would retrieve
       other bank patches, and with ``FODConfig.anchor`` the retrieved patch is part of the
       reconstruction; and of the regional and global levels (``RegionalLevel``, ``GlobalLevel``), whose
       minimum is their score;
    8. ``keep_last_matmul``: the last MatMul of each branch (the reconstruction head);
    9. outside ``scope``: ``transformer`` keeps every Conv FP32, ``backbone`` every MatMul / Gemm.

    Args:
        model: the FP32 model with named nodes.
        keep_last_matmul: also keep rule 8 nodes in FP32.
        scope: ``all``, ``transformer`` (MatMul / Gemm only) or ``backbone`` (Conv only).

    Raises:
        ValueError: unknown ``scope``.

    Returns:
        :class:`Int8Selection`.
    """
    if scope not in ("all", "transformer", "backbone"):
        raise ValueError(f"unknown INT8 scope {scope!r}; choose all, transformer or backbone")
    index = GraphIndex.build(model)
    tail = scoring_tail(index)
    last = last_matmuls(index) if keep_last_matmul else set()
    quantize: list[str] = []
    excluded: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in INT8_OP_TYPES:
            continue
        inputs = [x for x in node.input if x]
        if inputs and all(x in index.constants for x in inputs):
            excluded[node.name] = "constant subgraph"
        elif len(node.input) < 2 or node.input[1] not in index.constants:
            excluded[node.name] = "weight is an activation (attention product)"
        elif i in tail:
            excluded[node.name] = "scoring tail (after the last MatMul)"
        elif node.op_type == "Conv" and _one_channel_weight(index, node.input[1]):
            excluded[node.name] = "one-channel filter (input flat field)"
        elif node.op_type != "Conv" and _fed_by_softmax(index, i):
            excluded[node.name] = "input is softmax probabilities"
        elif _reaches(index, i, _SOFTMAX_OPS):
            excluded[node.name] = "output feeds a softmax (attention logits / RBF sigma)"
        elif _reaches(index, i, _ARG_OPS):
            excluded[node.name] = "output feeds an ArgMin / ReduceMin (nearest-patch search)"
        elif i in last:
            excluded[node.name] = "last MatMul of its branch (reconstruction head)"
        elif scope == "backbone" and node.op_type != "Conv":
            excluded[node.name] = "scope backbone: MatMul / Gemm kept FP32"
        elif scope == "transformer" and node.op_type == "Conv":
            excluded[node.name] = "scope transformer: Conv kept FP32"
        else:
            quantize.append(node.name)
    return Int8Selection(quantize, excluded)


def _one_channel_weight(index: GraphIndex, name: str) -> bool:
    """True when ``name`` (an initializer or a Constant node's output) is a ``[1, 1, kh, kw]`` Conv weight."""
    dims: list[int] | None = None
    for init in index.model.graph.initializer:
        if init.name == name:
            dims = list(init.dims)
    if dims is None and name in index.producer:
        node = index.model.graph.node[index.producer[name]]
        if node.op_type == "Constant":
            dims = next((list(a.t.dims) for a in node.attribute if a.name == "value"), None)
    return dims is not None and len(dims) == 4 and dims[0] == 1 and dims[1] == 1


def fp16_blocked_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes to keep FP32 in the FP16 variant beyond :data:`FP16_BLOCKED_OPS` (call :func:`name_nodes` first).

    * the scoring tail (after the last MatMul);
    * every node between the last compute op and a Softmax (attention scaling, the RBF exponent
      ``-D / (2 sigma^2)`` whose ``1 / sigma^2`` overflows FP16);
    * every node after a Softmax up to the next compute op (KL divergence, the patch softmax);
    * every MatMul / Gemm whose output reaches a ReduceMin without another compute op between: a distance
      to a memory bank whose minimum is itself a score (``fod.model.RegionalLevel``, ``GlobalLevel``).
      ``||x||^2 - 2 x.b + ||b||^2`` cancels: on magnetic-tile the global level's squared distance of about
      56 is the difference of terms up to 2700, where FP16 keeps steps of 2. The nodes after the MatMul
      are already in the scoring tail; this keeps the product itself. The nearest-patch search (ArgMin)
      only picks a patch and stays FP16 (keeping it FP32 did not change DEF18's FP16 map error).

    Returns:
        node name -> reason.
    """
    index = GraphIndex.build(model)
    nodes = model.graph.node
    blocked: dict[str, str] = {}
    for i in scoring_tail(index):
        blocked[nodes[i].name] = "scoring tail"
    for node in nodes:
        if node.op_type == "Cast":  # the converter rewrites Cast outputs but not their `to` attribute
            blocked.setdefault(node.name, "existing Cast")
    for i, node in enumerate(nodes):
        if node.op_type in ("MatMul", "Gemm") and _reaches(index, i, _SCORE_MIN_OPS):
            blocked.setdefault(node.name, "bank distance whose minimum is a score")
    for s, node in enumerate(nodes):
        if node.op_type not in _SOFTMAX_OPS:
            continue
        # upstream of the softmax, up to compute ops
        queue = deque(index.parents(s))
        seen: set[int] = set()
        while queue:
            i = queue.popleft()
            if i in seen or nodes[i].op_type in _COMPUTE_OPS:
                continue
            seen.add(i)
            blocked.setdefault(nodes[i].name, "feeds a softmax")
            queue.extend(index.parents(i))
        # downstream of the softmax, up to compute ops
        queue = deque(index.children(s))
        seen = set()
        while queue:
            i = queue.popleft()
            if i in seen or nodes[i].op_type in _COMPUTE_OPS:
                continue
            seen.add(i)
            blocked.setdefault(nodes[i].name, "after a softmax (KL / patch softmax)")
            queue.extend(index.children(i))
    return blocked


def keep_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Give FP32 consumers of a quantized activation the original FP32 tensor back.

    ONNX Runtime's QDQ quantizer routes *every* reader of a quantized activation through the
    ``DequantizeLinear`` output, so FP32 parts (residual adds, the reconstruction target, the
    scores) would see INT8-rounded values. This pass rewires each reader that is not one of the
    quantized nodes to the tensor before ``QuantizeLinear``, and drops Q/DQ pairs left unused.

    Args:
        model: the QDQ model, changed in place.
        quantized: names of the nodes that were quantized.

    Returns:
        Number of node inputs rewired.
    """
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_source: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_input:
            src = q_input[node.input[0]]
            if src not in init_names:
                dq_source[node.output[0]] = src
    rewired = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            if name in dq_source:
                node.input[k] = dq_source[name]
                rewired += 1
    # drop Q/DQ nodes nobody reads any more (repeat: removing a DQ frees its Q)
    outputs = {o.name for o in graph.output}
    while True:
        read = {x for n in graph.node for x in n.input} | outputs
        dead = [
            n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read
        ]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return rewired


def remove_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Remove ``Cast(to=FLOAT16) -> Cast(to=FLOAT)`` pairs on FP32 tensors (changed in place).

    The FP16 converter casts the output of every FP32-blocked node to FP16 and back to FP32 at the
    input of the next one, even when both are blocked: a run of "FP32" nodes then still rounds
    every intermediate to FP16, and e.g. ``sigma^2 = 1e-10`` underflows to 0 before its reciprocal.
    This pass makes such runs FP32 for real: readers of the round trip read the FP32 tensor.

    Returns:
        Number of round trips removed.
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.input})
    types.update({i.name: i.data_type for i in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((int(a.i) for a in node.attribute if a.name == "to"), None)

    replace: dict[str, str] = {}
    identities = 0
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != onnx.TensorProto.FLOAT:
            continue
        if node.output[0] in outputs:  # keep the graph output's name: the Cast becomes an Identity
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = first.input[0]
            identities += 1
        else:
            replace[node.output[0]] = first.input[0]
    if not replace and not identities:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in replace:
                node.input[k] = replace[name]
    while True:
        read = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and all(o not in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    produced = {o for n in graph.node for o in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:
        graph.value_info.remove(v)
    return len(replace) + identities
