"""image: bundle a kernel blob, rootfs layers and machine defaults into an image manifest."""

from __future__ import annotations

from castore.builders import BuildContext, ImageResult, Result
from castore.manifest import Image, Layer


def _image(ctx: BuildContext) -> Result:
    p = ctx.params
    layers = tuple(Layer(ctx.blob(f"layer{i}").id, "squashfs") for i in range(p["layers"]))
    return ImageResult(
        Image(
            kernel=ctx.blob("kernel").id,
            layers=layers,
            cmdline=p["cmdline"],
            overlay_size=p["overlay_size"],
            vcpus=p["vcpus"],
            mem_mib=p["mem_mib"],
        )
    )


BUILD = {"image": _image}
