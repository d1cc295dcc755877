"""`m2fp-prelabel export`: a Label Studio project's annotations as a training set (CIHP layout or COCO).

Data flows one way: LS tasks (source.py) -> regions as pixels (regions.py: raster.py polygons, brush.py RLE,
labels.py classes) -> persons and overlaps (compose.py) -> files (cihp.py / coco.py, files.py); run.py is the loop,
cli.py the arguments. Rules and layouts: docs/export.md.
"""
