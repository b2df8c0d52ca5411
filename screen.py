#!/usr/bin/env python3
"""Screen a folder of chest X-ray studies: python screen.py ./studies --out report.csv"""

from pneumonia_batch.cli import screen

if __name__ == "__main__":
    screen()
