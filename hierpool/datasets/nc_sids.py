"""North Carolina's sudden infant deaths by county, 1974-78 and 1979-84: the classic disease-mapping data set.

Cressie & Read (1985); Cressie (1993), *Statistics for Spatial Data*; the 100 counties as distributed in the
shapefile ``nc.shp`` of R's sf package, shipped here as GeoJSON (lon/lat, NAD27) with the queen-contiguity
edge list computed from those polygons (245 pairs).  Loaded with the standard library and pandas: no geopandas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class AreaData:
    """Areal data: one row per area, the areas' adjacency and their polygons.

    Attributes
    ----------
    data : pandas.DataFrame
        One row per area (its label in ``county``).
    adjacency : pandas.DataFrame
        The edge list: columns ``a`` and ``b``, area labels, each neighbouring pair once.
    geometry : dict
        Area label -> its polygons, each a list of rings, each ring an (m, 2) array of lon/lat.
    """

    data: pd.DataFrame
    adjacency: pd.DataFrame
    geometry: dict


def nc_sids() -> AreaData:
    """The 100 counties of North Carolina with SIDS deaths, births, non-white births, adjacency and polygons.

    ``data`` columns: ``county`` (the name, the area label), ``fips``, ``births74``, ``sid74``, ``nwbir74``,
    ``births79``, ``sid79``, ``nwbir79``, and, for 1974-78, ``expected`` (internally standardised expected deaths:
    each county's births times the state's death rate, sum of expected = sum of deaths), ``sir`` (the
    standardised incidence ratio sid74 / expected) and ``nwbir_rate`` (the share of non-white births, the usual
    covariate).  Model: ``sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type='bym2')``.
    """
    folder = resources.files(__package__).joinpath("data")
    with folder.joinpath("nc_sids.geojson").open() as handle:
        features = json.load(handle)["features"]
    rows, geometry = [], {}
    for feature in features:
        p = feature["properties"]
        rows.append({"county": p["NAME"], "fips": p["FIPS"], "births74": p["BIR74"], "sid74": int(p["SID74"]),
                     "nwbir74": p["NWBIR74"], "births79": p["BIR79"], "sid79": int(p["SID79"]),
                     "nwbir79": p["NWBIR79"]})
        shape = feature["geometry"]
        polygons = shape["coordinates"] if shape["type"] == "MultiPolygon" else [shape["coordinates"]]
        geometry[p["NAME"]] = [[np.asarray(ring, dtype=float) for ring in polygon] for polygon in polygons]
    data = pd.DataFrame(rows)
    rate = data["sid74"].sum() / data["births74"].sum()
    data["expected"] = data["births74"] * rate
    data["sir"] = data["sid74"] / data["expected"]
    data["nwbir_rate"] = data["nwbir74"] / data["births74"]
    with folder.joinpath("nc_sids_adjacency.csv").open() as handle:
        adjacency = pd.read_csv(handle, dtype=str)
    return AreaData(data=data, adjacency=adjacency, geometry=geometry)
