"""A simulator of the Eachlabs API (aiohttp.web), for the demo, the tests and the benchmark."""
