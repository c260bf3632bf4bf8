"""cubelet"""
