"""Collection definitions: what a collection is, how its COGs are made and how its tiles look."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyvault.ids import check_id

Resampling = Literal[
    "nearest", "mode", "average", "bilinear", "cubic", "cubicspline", "lanczos", "gauss", "rms"
]


class CogProfile(BaseModel):
    """GDAL COG driver options for a collection (defaults follow the view-server profile)."""

    model_config = ConfigDict(extra="forbid")

    compress: Literal["DEFLATE", "LZW", "ZSTD", "JPEG", "WEBP", "NONE"] = "DEFLATE"
    blocksize: int = Field(512, ge=64, le=4096)
    overview_resampling: Resampling = "average"
    warp_resampling: Resampling = "nearest"
    predictor: Literal["YES", "NO", "STANDARD", "FLOATING_POINT"] | None = None
    level: int | None = Field(None, ge=1, le=22)
    bigtiff: Literal["YES", "NO", "IF_NEEDED", "IF_SAFER"] = "IF_SAFER"
    categorical: bool = False
    #: How a raster placed by GCPs is warped: GDAL's polynomial, a thin-plate spline through every
    #: GCP, or ``auto``: the polynomial when it passes within half a pixel of every GCP, else the spline.
    gcp_transformer: Literal["auto", "polynomial", "tps"] = "auto"

    @model_validator(mode="after")
    def _categorical_resampling(self) -> CogProfile:
        if self.categorical:
            for name in ("overview_resampling", "warp_resampling"):
                if getattr(self, name) not in ("nearest", "mode"):
                    raise ValueError(f"categorical data must use nearest or mode for {name}")
        return self

    def creation_options(self) -> dict[str, str]:
        """GDAL COG driver creation options for this profile."""
        opts = {
            "COMPRESS": self.compress,
            "BLOCKSIZE": str(self.blocksize),
            # a categorical source's own overviews may have been averaged: always rebuild them
            "OVERVIEWS": "IGNORE_EXISTING" if self.categorical else "AUTO",
            "OVERVIEW_RESAMPLING": self.overview_resampling.upper(),
            "BIGTIFF": self.bigtiff,
            "NUM_THREADS": "ALL_CPUS",
        }
        if self.predictor:
            opts["PREDICTOR"] = self.predictor
        if self.level is not None:
            opts["LEVEL"] = str(self.level)
        return opts


class RenderConfig(BaseModel):
    """How tiles of a collection are rendered with rio-tiler.

    What is set is used as given; what is left unset gets a default per COG:

    - ``bands``: every band for one or three bands (alpha bands only mask: grey + alpha, RGB +
      alpha), the first of two, the first three of four or more (e.g. RGB of RGB + near infrared).
    - ``rescale`` and ``colormap`` (both unset): one band with a colour table is shown through
      that table (its nodata stays transparent); 8-bit data as it is; other data is stretched
      linearly per band, from the lowest minimum to the highest maximum of the ``raster:bands``
      statistics of the layer's items (or, for items without them, of the COGs' smallest
      overviews). Setting either one renders exactly as configured: ``rescale`` maps its ranges to
      0..255, then ``colormap`` (a rio-tiler colormap name) colours one band.

    Paletted COGs are warped with nearest resampling, whatever the collection's ``warp_resampling``.
    """

    model_config = ConfigDict(extra="forbid")

    bands: list[int] | None = None
    rescale: list[tuple[float, float]] | None = None
    colormap: str | None = None
    format: Literal["png", "webp"] = "png"
    tile_size: int = 256


class CollectionConfig(BaseModel):
    """One configured collection."""

    model_config = ConfigDict(extra="forbid")

    id: str
    title: str = ""
    description: str = ""
    license: str = "proprietary"
    keywords: list[str] = Field(default_factory=list)
    cog: CogProfile = Field(default_factory=CogProfile)
    target_crs: str | None = None
    nodata: float | None = None
    bands: list[int] | None = None
    render: RenderConfig = Field(default_factory=RenderConfig)
    min_zoom: int = Field(0, ge=0, le=24)
    max_zoom: int = Field(6, ge=0, le=24)
    pattern: str = "*.tif"
    pattern_kind: Literal["glob", "regex"] = "glob"

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_id(v, "collection id")

    @model_validator(mode="after")
    def _zoom_order(self) -> CollectionConfig:
        if self.min_zoom > self.max_zoom:
            raise ValueError(f"collection {self.id}: min_zoom {self.min_zoom} > max_zoom {self.max_zoom}")
        return self
