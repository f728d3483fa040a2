"""Simulated SFX runs with exact ground truth: physics, images, reflection lists and the truth file.

``Experiment(SimulationConfig(...)).frame(i)`` gives frame i's pixels and truth; ``.reflections(i)`` what a perfect
analysis would integrate from it. See docs/simulator.md.
"""

from libs.simulator.config import SimulationConfig
from libs.simulator.experiment import Experiment, FrameTruth, SimulatedFrame

__all__ = ["Experiment", "FrameTruth", "SimulatedFrame", "SimulationConfig"]
