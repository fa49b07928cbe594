"""kerasdet.data"""
