"""Every exported file run and judged: the parity gate, the client matrix, test-split evaluation, the benchmark.
May import quantize, export, train, edgeft.run, nn, data, core; never pipeline or cli.
"""
