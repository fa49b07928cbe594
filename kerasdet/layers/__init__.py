"""kerasdet.layers"""
