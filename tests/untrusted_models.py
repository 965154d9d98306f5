"""Hostile models, built in code the way an attacker would: real TensorFlow SavedModels whose serving function
writes, reads or lists files, calls Python or saves a checkpoint, and ONNX graphs with operators from outside
the standard domains. Each computes a plausible two-class segmentation (softmax over ``[x, -x]``) beside its
side effect, so only the audit stands between it and a run.

``python tests/untrusted_models.py --regenerate-tf-ops`` rewrites ``czregistry/_tf_ops.py`` (the audit's
allow-list) from the installed TensorFlow's op registry.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

#: SavedModel kind -> (the op the audit must name, what a run of it would do to ``target``).
SAVEDMODEL_KINDS = {
    "write_file": "WriteFile",
    "read_file": "ReadFile",
    "py_function": "EagerPyFunc",
    "list_dir": "MatchingFiles",
    "save_checkpoint": "SaveV2",
    "print_to_file": "PrintV2",
}
#: ONNX kind -> the op label the audit must name.
ONNX_KINDS = {
    "custom_domain": "org.evil::Exfiltrate",
    "contrib_op": "com.microsoft::Gelu",
    "function_unknown_domain": "org.evil::Escape",
    "external_data": "external data",
}


def savedmodel_zip(kind: str, target: Path, workdir: Path) -> bytes:
    """A zipped SavedModel whose ``serving_default`` does ``kind`` to ``target`` (a file or folder path)."""
    import tensorflow as tf

    from czregistry.package import zip_directory

    path = str(target)

    def side_effect(x: Any) -> Any:
        """Returns a float scalar that depends on the side effect, so TensorFlow cannot prune it."""
        zero = tf.zeros((), tf.float32)
        if kind == "write_file":
            tf.io.write_file(path, "written by a package")
        elif kind == "read_file":
            zero = 0.0 * tf.cast(tf.strings.length(tf.io.read_file(path)), tf.float32)
        elif kind == "py_function":
            zero = tf.reduce_sum(tf.py_function(lambda t: t * 0.0, [tf.reduce_sum(x)], tf.float32))
        elif kind == "list_dir":
            zero = 0.0 * tf.cast(tf.size(tf.io.matching_files(path + "/*")), tf.float32)
        elif kind == "save_checkpoint":
            tf.raw_ops.SaveV2(prefix=path, tensor_names=["x"], shape_and_slices=[""], tensors=[tf.reduce_sum(x)])
        elif kind == "print_to_file":
            tf.print("input sum", tf.reduce_sum(x), output_stream=f"file://{path}")
        else:
            raise ValueError(kind)
        return zero

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
        def serve(self, x: Any) -> Any:
            return {"output_0": tf.nn.softmax(tf.concat([x, -x], axis=-1) + side_effect(x), axis=-1)}

    module = Hostile()
    folder = workdir / f"hostile-{kind}-{uuid.uuid4().hex[:6]}"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    data = zip_directory(folder)
    assert isinstance(data, bytes)
    return data


def onnx_model(kind: str) -> bytes:
    """An ONNX graph NHWC [N, H, W, 1] -> softmax([x, -x]) with one non-standard element of ``kind``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 1])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "H", "W", 2])
    nodes = [helper.make_node("Neg", ["input"], ["neg"]),
             helper.make_node("Concat", ["input", "neg"], ["both"], axis=-1)]
    initializers: list[Any] = []
    functions: list[Any] = []
    opsets = [helper.make_opsetid("", 17)]
    if kind == "custom_domain":
        nodes.append(helper.make_node("Exfiltrate", ["both"], ["pre"], domain="org.evil"))
        opsets.append(helper.make_opsetid("org.evil", 1))
    elif kind == "contrib_op":
        nodes.append(helper.make_node("Gelu", ["both"], ["pre"], domain="com.microsoft"))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    elif kind == "function_unknown_domain":
        body = [helper.make_node("Escape", ["a"], ["b"], domain="org.evil")]
        functions.append(helper.make_function("local.fn", "Wrap", ["a"], ["b"], body,
                                              [helper.make_opsetid("", 17), helper.make_opsetid("org.evil", 1)]))
        nodes.append(helper.make_node("Wrap", ["both"], ["pre"], domain="local.fn"))
        opsets += [helper.make_opsetid("local.fn", 1), helper.make_opsetid("org.evil", 1)]
    elif kind == "external_data":
        zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
        zero.ClearField("raw_data")
        zero.data_location = TensorProto.EXTERNAL
        zero.external_data.add(key="location", value="../../../../etc/passwd")
        initializers.append(zero)
        nodes.append(helper.make_node("Add", ["both", "zero"], ["pre"]))
    else:
        raise ValueError(kind)
    nodes.append(helper.make_node("Softmax", ["pre"], ["output"], axis=-1))
    graph = helper.make_graph(nodes, "hostile", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="hostile")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def clean_onnx_model() -> bytes:
    """The same computation with standard operators only: the control that must audit clean and run."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "H", "W", 1])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "H", "W", 2])
    nodes = [helper.make_node("Neg", ["input"], ["neg"]),
             helper.make_node("Concat", ["input", "neg"], ["both"], axis=-1),
             helper.make_node("Softmax", ["both"], ["output"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "clean", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def regenerate_tf_ops(dest: Path) -> int:
    """Rewrite the audit's TensorFlow allow-list from the installed TensorFlow; returns the op count."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    from czregistry.audit import tf_danger

    pure = []
    for name in sorted(n for n in dir(tf.raw_ops) if not n.startswith("_")):
        op_def = op_def_registry.get(name)
        if op_def is not None and not op_def.is_stateful and tf_danger(name) is None:
            pure.append(name)
    body = textwrap.fill(", ".join(f'"{n}"' for n in pure), width=116, initial_indent="    ",
                         subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
    dest.write_text(f'''"""TensorFlow's pure tensor operations: the graph audit's allow-list (``czregistry.audit``).

Generated from TensorFlow {tf.__version__}'s op registry: every op TensorFlow registers as not stateful, minus the
families ``audit.tf_danger`` names (file and directory I/O, Python, datasets, queues, summaries, debug output,
decoders, other processes). Data, not logic, so the audit runs without TensorFlow. ``tests/test_untrusted.py``
checks it against the installed TensorFlow; ops added by later TensorFlow releases are refused until this
list is regenerated (``python tests/untrusted_models.py --regenerate-tf-ops``).
"""

PURE_TF_OPS = frozenset({{
{body}
}})
''', encoding="utf-8")
    return len(pure)


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate-tf-ops"]:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        print(regenerate_tf_ops(root / "czregistry" / "_tf_ops.py"), "ops")
    else:
        sys.exit("usage: python tests/untrusted_models.py --regenerate-tf-ops")
