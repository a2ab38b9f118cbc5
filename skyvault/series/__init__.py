"""Sensor time series: samples from landing files into a database, reduced into cached blocks.

``samples`` parses and validates sample files, ``database`` stores samples once per node and
timestamp (SQLite or PostgreSQL), ``reduce`` bins samples into min/mean/max/count per period, and
``blocks`` writes and reads those periods as Parquet blocks on the object store, ``readers``
runs a source's reader command in place of the database, and ``read`` serves a range at a
resolution from the blocks, live where they are missing.
"""
