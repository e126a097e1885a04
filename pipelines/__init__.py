"""Prefect flows and deployments that wire the cpo_data stages together.

The library (`cpo_data`) never imports Prefect; everything Prefect-specific lives here.
"""
