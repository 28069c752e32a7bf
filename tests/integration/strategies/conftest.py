"""Datasets every strategy test trains on, loaded once per session."""

import pytest

import downpour as dp


@pytest.fixture(scope="session")
def mnist(shared_data):
    return dp.data.load("mnist", data_dir=shared_data)


@pytest.fixture(scope="session")
def digits():
    return dp.data.load("digits")
