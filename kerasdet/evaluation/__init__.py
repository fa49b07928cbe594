"""kerasdet.evaluation"""
