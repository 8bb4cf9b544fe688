DROP TABLE IF EXISTS work_orders;
